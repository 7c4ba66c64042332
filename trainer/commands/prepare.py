"""`kiln prepare RECIPE`: tokenise the recipe's corpus into indexed files ahead of training."""
from kiln.trainer.commands.common import prepare_data, with_recipe
from kiln.trainer.config import load_recipe


def add_parser(sub) -> None:
    """Declare `kiln prepare`'s arguments."""
    with_recipe(sub, "prepare", "tokenise the recipe's corpus into indexed files (cached)")


def run(args) -> int:
    """Prepare (and repair, if corrupt) the data cache; one line says where it is."""
    p = prepare_data(load_recipe(args.recipe, args.set), repair=True)
    print(f"kiln: data ready in {p.dir} ({p.train_tokens:,} train / {p.valid_tokens:,} held-out tokens)")
    return 0
