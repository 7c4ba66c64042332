"""What several commands share: the recipe arguments, the writable-folder check, preparing the
data, and the closing "where is everything" lines of a finished run."""
import tempfile
from pathlib import Path

from kiln.trainer.checkpoint import latest_tag
from kiln.trainer.config import ConfigError


def with_recipe(sub, name: str, help_: str):
    """Add command `name` taking a recipe path and repeatable --set overrides; its parser."""
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=50 (repeatable)")
    return p


def writable_dir(path, knob: str) -> None:
    """Create `path` if needed and check that a file can be written there, or name the knob."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{knob}={path} is not a writable folder ({e.strerror or e}): point {knob} "
                          f"at one (--set {knob}=DIR)") from None


def prepare_data(recipe, repair: bool = False):
    """Prepared data for the recipe; only `kiln prepare` repairs a corrupt cache."""
    from kiln.data.prepare import prepare

    writable_dir(recipe.data.cache_dir, "data.cache_dir")
    return prepare(recipe.data, progress=True, repair=repair)


def print_where(run_dir: Path, recipe) -> None:
    """After a finished run: where its checkpoints, metrics and W&B files are, and what reads them."""
    print(f"\nkiln: done. Run directory: {run_dir}")
    print(f"  checkpoints: {run_dir / 'checkpoints'} (newest: {latest_tag(run_dir)})")
    print(f"  metrics:     {run_dir / recipe.logging.metrics_file}  ->  kiln report {run_dir}")
    if recipe.logging.wandb.mode == "offline":
        print(f"  W&B offline: {run_dir / 'wandb'}  ->  wandb sync {run_dir / 'wandb'}/offline-run-*")
