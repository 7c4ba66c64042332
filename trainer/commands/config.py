"""`kiln config [RECIPE]`: print the resolved recipe, or with --reference every recipe key."""
from kiln.trainer.config import ConfigError, load_recipe, reference_markdown, to_yaml


def add_parser(sub) -> None:
    """Declare `kiln config`'s arguments (the recipe is optional: --reference needs none)."""
    c = sub.add_parser("config", help="print the resolved recipe, or the recipe reference")
    c.add_argument("recipe", nargs="?", help="recipe YAML")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    c.add_argument("--reference", action="store_true", help="print every recipe key as a markdown table")


def run(args) -> int:
    """Print the reference table, or the recipe with its overrides applied, as YAML."""
    if args.reference:
        print(reference_markdown(), end="")
        return 0
    if not args.recipe:
        raise ConfigError("kiln config needs a recipe path (or --reference)")
    print(to_yaml(load_recipe(args.recipe, args.set)), end="")
    return 0
