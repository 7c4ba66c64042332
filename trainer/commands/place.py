"""`kiln place RUN_DIR`: solve MoE expert placement from a run's routing profile."""
from kiln.trainer.config import ConfigError


def add_parser(sub) -> None:
    """Declare `kiln place`'s arguments: the solver's world, budget and strategy."""
    p = sub.add_parser("place", help="solve MoE expert placement (MoETuner ILP) from a run's routing profile",
                       description="Solve MoETuner's ILP on RUN_DIR's latest routing profile and write "
                                   "RUN_DIR/placement.json (apply it with --set parallel.placement=PATH).")
    p.add_argument("run_dir", help="e.g. runs/moe_tiny")
    p.add_argument("--ranks", type=int, help="expert-parallel ranks (default: the run's parallel.ep)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks span (default 1)")
    p.add_argument("--time-limit", type=float, default=60.0, help="solver seconds (default 60)")
    p.add_argument("--profile", help="routing profile .npz (default: RUN_DIR/profiles/routing_latest.npz)")
    p.add_argument("--strategy", default="ilp", choices=["ilp", "greedy_lpt", "round_robin", "contiguous"],
                   help="placement strategy (default ilp)")
    p.add_argument("--refine", action="store_true",
                   help="ilp: add kiln's stage 3, which cuts cross-rank traffic under a balance floor")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--coselect", dest="coselect", action="store_true", default=None,
                   help="ilp: co-locate experts one token chooses together (fewer all-to-all bytes under "
                        "parallel.moe_dedup; the default when the run dedups and its profile counts pairs)")
    c.add_argument("--no-coselect", dest="coselect", action="store_false",
                   help="ilp: balance and cross-layer traffic only (MoETuner's objective)")
    p.add_argument("--min-balance", type=float, default=0.95,
                   help="with --refine: each layer keeps balancedness >= min(this, its ILP value)")


def run(args) -> int:
    """Check the numbers before the solver sees them (one line, not a solver error), solve, report."""
    from kiln.trainer.moe_tools import format_place, place_run

    if (args.ranks is not None and args.ranks < 2) or args.nodes < 1 or args.time_limit <= 0 \
            or not 0 <= args.min_balance <= 1:
        raise ConfigError("kiln place needs --ranks >= 2, --nodes >= 1, --time-limit > 0 "
                          "and 0 <= --min-balance <= 1")
    res, base, out = place_run(args.run_dir, args.ranks, args.nodes, args.time_limit, args.profile,
                               args.strategy, args.refine, args.min_balance, args.coselect)
    print(format_place(res, base, out))
    return 0
