"""The `kiln` commands, one module each: `add_parser(sub)` declares its arguments, `run(args)`
does the work and returns the exit code. kiln.trainer.cli builds the parser from COMMANDS and maps
user errors to exit codes; a new command is a new module here plus one line below."""
from kiln.trainer.commands import (config, eval, export, expertflow, generate, grow, import_hf, place, prepare,
                                   profile_routing, report, status, submit, train)

# the order `kiln --help` lists them in
COMMANDS = {"train": train, "submit": submit, "status": status, "prepare": prepare, "config": config,
            "report": report, "place": place, "profile-routing": profile_routing, "grow": grow,
            "generate": generate, "eval": eval, "expertflow": expertflow, "export": export,
            "import-hf": import_hf}
