"""The `kiln` command: the parser, built from kiln.trainer.commands (one module per command:
train, prepare, config, report, place, profile-routing, grow, generate, eval, expertflow, ...),
and user errors mapped to exit codes."""
import argparse
import sys

from kiln.trainer.errors import CheckpointError
from kiln.trainer.commands import COMMANDS
from kiln.trainer.config import ConfigError, did_you_mean


class _Strict(argparse.ArgumentParser):
    """A subcommand parser that takes no abbreviations: a typo such as --no-resum must not pass
    for --no-resume (argparse allows prefixes by default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    """The whole `kiln` parser, and its subparsers by command name (for the misspelt-option hint)."""
    ap = argparse.ArgumentParser(prog="kiln", description="kiln: efficient LLM pretraining", allow_abbrev=False)
    ap.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Strict)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return ap, sub.choices


def main(argv=None) -> int:
    """Console entry point; user errors print one line and return 2."""
    from kiln.data.errors import DataError, storage_message
    from kiln.infer.errors import InferError
    from kiln.parallel.placement.io import PlacementError

    parser, subparsers = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse alone says "unrecognized arguments"; name the option the user meant
        options = [o for a in subparsers[args.cmd]._actions for o in a.option_strings]
        hint = did_you_mean(extra[0].split("=")[0], options) if extra[0].startswith("-") else ""
        print(f"kiln: error: kiln {args.cmd} does not take {' '.join(extra)}{hint}: see kiln {args.cmd} --help",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.cmd].run(args)
    except (ConfigError, DataError, CheckpointError, PlacementError, InferError) as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if (line := storage_message(e)) is None:
            raise
        print(f"kiln: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted; everything saved so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
