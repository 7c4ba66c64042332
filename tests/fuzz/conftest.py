"""The trainer tests' fixtures (a small recipe whose data cache is shared by the session)."""
from tests.trainer.conftest import kiln_home, small_recipe  # noqa: F401 - pytest fixtures
