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
    print(f"  metrics:     {run_dir / recipe.logging.metrics_file}  ->  kiln report {run_dir} [--out {run_dir / 'report'}]")
    if recipe.logging.wandb.mode == "offline":
        print(f"  W&B offline: {run_dir / 'wandb'}  ->  wandb sync {run_dir / 'wandb'}/offline-run-*")


class Opened:
    """A checkpoint opened for use outside training: its folder, the recipe of the stage it was
    saved in (a grown run's later stages have the large model), its progress and its data."""

    def __init__(self, tag_dir: Path, recipe, progress: dict):
        self.tag_dir, self.recipe, self.progress = tag_dir, recipe, progress
        self._data = None

    @property
    def data(self):
        """The prepared data (tokenizer, held-out split) the checkpoint was trained on."""
        if self._data is None:
            from kiln.data.prepare import prepare

            self._data = prepare(self.recipe.data, progress=False)
        return self._data

    def model_config(self):
        from kiln.trainer.stage import resolve_model

        return resolve_model(self.recipe, self.data.vocab_size)

    def model(self):
        """The checkpoint's model, unsharded fp32 on the CPU, in eval mode."""
        from kiln.infer.load import load_model
        from kiln.trainer.checkpoint import CheckpointError

        try:
            return load_model(self.tag_dir, self.model_config(), self.recipe.parallel.zero_stage)
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.tag_dir} cannot be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def open_checkpoint(path) -> Opened:
    """A run directory's newest checkpoint, or the checkpoint folder `path` itself."""
    import json

    import yaml

    from kiln.trainer.checkpoint import CheckpointError, ckpt_root
    from kiln.trainer.config import from_dict
    from kiln.trainer.stages import stage_specs

    path = Path(path)
    tag = latest_tag(path) if path.is_dir() else None
    tag_dir = path if (path / "kiln_recipe.yaml").is_file() else (ckpt_root(path) / tag if tag else None)
    if tag_dir is None or not (tag_dir / "kiln_state.json").is_file():
        raise ConfigError(f"{path} is neither a kiln run directory with checkpoints nor a checkpoint directory "
                          "(e.g. runs/tiny or runs/tiny/checkpoints/step_00000150)")
    try:
        recipe = from_dict(yaml.safe_load((tag_dir / "kiln_recipe.yaml").read_text()), saved=True)
        progress = json.loads((tag_dir / "kiln_state.json").read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {tag_dir} has a corrupt recipe or state file ({type(e).__name__}): "
                              "pick another checkpoint") from None
    progress = progress.get("progress", progress)
    specs = stage_specs(recipe, recipe.train.nproc)
    stage = specs[min(int(progress.get("stage", 0)), len(specs) - 1)].recipe
    return Opened(tag_dir, stage, progress)
