"""`kiln grow plan --target-params N --target-tokens D [--factor 4]`: when G_stack should grow;
`kiln grow CKPT --out DIR [--factor 4] [--op stack|zero]`: grow a checkpoint by hand into a run
directory that `kiln train DIR/recipe.yaml` continues as the large model."""
from pathlib import Path

from kiln.trainer.config import ConfigError


def add_parser(sub) -> None:
    """Declare `kiln grow`'s arguments."""
    p = sub.add_parser("grow", help="model growth (G_stack): plan when to grow, or grow a checkpoint",
                       description="`kiln grow plan`: print d, the tokens to train the small model for "
                                   "before growing it factor x deeper (the G_stack authors' fitted formula). "
                                   "`kiln grow CKPT --out DIR`: stack a checkpoint's layers into a new run "
                                   "directory that `kiln train DIR/recipe.yaml` continues as the large model.")
    p.add_argument("what", metavar="plan|CKPT", help="plan, or a run directory / checkpoint directory to grow")
    p.add_argument("--target-params", type=float, help="plan: parameters of the grown model, e.g. 7e9")
    p.add_argument("--target-tokens", type=float, help="plan: its token budget, e.g. 2e12")
    p.add_argument("--factor", type=int, default=4, help="growth factor g (default 4, the paper's)")
    p.add_argument("--op", default="stack", choices=["stack", "zero"], help="CKPT: operator (default stack)")
    p.add_argument("--out", help="CKPT: the new run directory (must not exist)")


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def format_plan(p, factor: int) -> str:
    """The console report of `kiln grow plan`."""
    lines = [f"kiln grow plan: target {_human(p.target_params)} parameters, {_human(p.target_tokens)} tokens",
             f"  grow after d = {_human(p.tokens)} tokens ({100 * p.share:.3g}% of the budget): train the small "
             f"model (the target's n_layers / {factor}, same width) for d tokens, stack it {factor}x, and train "
             f"the grown model on the remaining {_human(max(p.target_tokens - p.tokens, 0))}",
             f"  recipe: growth: {{op: stack, factor: {factor}, at_tokens: {int(p.tokens)}}}"]
    lines += [f"  warning: {w}" for w in p.warnings]
    if p.warnings:
        lines.append("  -> choose growth.at_tokens yourself (a token count or a fraction of the budget)")
    return "\n".join(lines)


def run(args) -> int:
    if args.what == "plan":
        from kiln.growth.plan import plan

        if args.target_params is None or args.target_tokens is None:
            raise ConfigError("kiln grow plan needs --target-params N and --target-tokens D")
        if args.target_params <= 0 or args.target_tokens <= 0 or args.factor < 2:
            raise ConfigError("kiln grow plan needs --target-params > 0, --target-tokens > 0 and --factor >= 2")
        print(format_plan(plan(args.target_params, args.target_tokens), args.factor))
        return 0
    if not args.out:
        raise ConfigError("kiln grow CKPT needs --out DIR, the run directory to write the grown model to")
    if args.factor < 2:
        raise ConfigError(f"--factor must be >= 2 to grow (got {args.factor}): the paper's g = 4")
    tag_dir, out = grow_checkpoint(Path(args.what), Path(args.out), args.factor, args.op)
    print(f"kiln grow: {args.op} x{args.factor} of {args.what} -> {tag_dir}\n"
          f"  continue with: kiln train {out / 'recipe.yaml'}  (raise train.steps there to train longer)")
    return 0


def grow_checkpoint(path: Path, out: Path, factor: int, op: str):
    """Grow the checkpoint at `path` (a run dir's newest or a tag dir) into the run dir `out`."""
    import dataclasses

    from kiln.growth.ops import grow
    from kiln.infer.load import checkpoint_state
    from kiln.model import param_count
    from kiln.trainer.checkpoint import CheckpointError
    from kiln.trainer.commands.common import open_checkpoint
    from kiln.trainer.config import from_dict, to_dict
    from kiln.trainer.growth import write_grown_checkpoint
    from kiln.trainer.stage import resolve_model

    if out.exists():
        raise ConfigError(f"--out {out} exists: name a new folder (kiln grow never overwrites a run)")
    opened = open_checkpoint(path)
    tag_dir, stage, progress = opened.tag_dir, opened.recipe, opened.progress
    try:
        state = checkpoint_state(tag_dir, stage.model, stage.parallel.zero_stage)
        small = resolve_model(stage, state["embed.weight"].shape[0])
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {tag_dir} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    large = dataclasses.replace(small, n_layers=small.n_layers * factor)
    try:
        grown = grow(op, state, small, large, factor)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    values = to_dict(stage)
    values["model"]["n_layers"] = large.n_layers
    values["growth"] = {"op": "none"}
    values["train"].update(name=out.name, run_root=str(out.parent))
    big_recipe = to_dict(from_dict(values, saved=True))
    done = {"stage": 0, "step": int(progress.get("step", 0)), "tokens": int(progress.get("tokens", 0)),
            "flops": float(progress.get("flops", 0.0))}
    tag = write_grown_checkpoint(out, big_recipe, grown, done, (param_count(small), param_count(large)))
    return tag, out
