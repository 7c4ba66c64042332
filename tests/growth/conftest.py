"""The trainer tests' small recipe and data cache, for growth runs."""
from tests.trainer.conftest import kiln_home, small_recipe  # noqa: F401
