"""Entry point of one rank: `python -m kiln.trainer.worker --run-dir R --data-dir D`.

The parent (`kiln train`) has validated the recipe, prepared the data and written the resolved
recipe to R/recipe.yaml; every rank reads that same file.
"""
import argparse
import os
import sys
from pathlib import Path

from kiln.data.errors import DataError, storage_message
from kiln.trainer.checkpoint import CheckpointError
from kiln.trainer.config import ConfigError, load_recipe
from kiln.trainer.hooks import stop
from kiln.trainer.hooks.guard import Diverged
from kiln.trainer.launch import exit_rank, watch_parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kiln.trainer.worker")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args(argv)
    stop.install(["TERM", "USR1"])  # first: a signal during start-up stops after the first step
    watch_parent()
    run_dir = Path(args.run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    from kiln.trainer.run import train  # heavy imports (deepspeed) only in ranks

    try:
        finished = train(recipe, run_dir, Path(args.data_dir))
    except (CheckpointError, ConfigError, DataError, Diverged) as e:  # user errors: one line, no traceback
        _error(str(e))
        return 2
    except OSError as e:  # a full disk while checkpointing, ...
        if (line := storage_message(e)) is None:
            raise
        _error(line)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (torchrun forwards it): `kiln train` reports it once
        return 130
    if not finished and os.environ.get("RANK", "0") == "0":
        from kiln.trainer.checkpoint import latest_tag

        print(f"kiln: stopped by SIG{stop.asked()} after {latest_tag(run_dir)} (checkpoint saved): "
              "run the same command to resume", flush=True)
    return 0


def _error(text: str) -> None:
    # one write per line: the ranks share torchrun's stderr, and print's separate "\n" lets two
    # ranks' lines run together
    sys.stderr.write(f"kiln: error: {text}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    exit_rank(main())
