"""`kiln report RUN_DIR`: summarise a run directory's metrics."""
from pathlib import Path

from kiln.trainer.config import ConfigError


def add_parser(sub) -> None:
    """Declare `kiln report`'s arguments."""
    r = sub.add_parser("report", help="summarise a run directory's metrics")
    r.add_argument("run_dir", help="e.g. runs/tiny")


def run(args) -> int:
    """Print the summary; a folder with no metrics is a user error, not a traceback."""
    from kiln.trainer.report import report

    try:
        print(report(Path(args.run_dir)))
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return 0
