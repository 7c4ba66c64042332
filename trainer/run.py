"""A training run: the process-long Run, its stages, and the entry point of one rank."""
from kiln.trainer.loop import train  # noqa: F401  (the Run -> Stage -> loop spine replaces it)
