"""`kiln profile-routing PATH`: record a checkpoint's MoE routing on held-out data (for `kiln place`)."""
from kiln.trainer.config import ConfigError


def add_parser(sub) -> None:
    """Declare `kiln profile-routing`'s arguments."""
    g = sub.add_parser("profile-routing", help="profile MoE routing of a checkpoint on held-out data",
                       description="Route held-out batches through a checkpoint and save the per-layer "
                                   "expert loads and transition matrices under RUN_DIR/profiles/.")
    g.add_argument("path", help="run directory (newest checkpoint) or a checkpoint directory")
    g.add_argument("--batches", type=int, default=16, help="held-out batches to route (default 16)")
    g.add_argument("--out", help="write the profile here instead of RUN_DIR/profiles/")


def run(args) -> int:
    """Route, save the profile, and print where it went and how balanced each layer is."""
    from kiln.trainer.moe_tools import format_profile, profile_checkpoint

    if args.batches < 1:
        raise ConfigError("kiln profile-routing needs --batches >= 1")
    prof, saved, quality, held = profile_checkpoint(args.path, args.batches, args.out)
    print(format_profile(prof, saved, quality, held))
    return 0
