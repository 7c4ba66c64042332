"""Entry point of one rank: `python -m kiln.trainer.worker --run-dir R --data-dir D`.

The parent (`kiln train`) has validated the recipe, prepared the data and written the resolved
recipe to R/recipe.yaml; every rank reads that same file.
"""
import argparse
import sys
from pathlib import Path

from kiln.data.errors import DataError, storage_message
from kiln.trainer.checkpoint import CheckpointError
from kiln.trainer.config import ConfigError, load_recipe
from kiln.trainer.launch import watch_parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kiln.trainer.worker")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args(argv)
    watch_parent()
    run_dir = Path(args.run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    from kiln.trainer.run import train  # heavy imports (deepspeed) only in ranks

    try:
        train(recipe, run_dir, Path(args.data_dir))
    except (CheckpointError, ConfigError, DataError) as e:  # user errors: one line, no traceback
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk while checkpointing, ...
        if (line := storage_message(e)) is None:
            raise
        print(f"kiln: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (torchrun forwards it): `kiln train` reports it once
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
