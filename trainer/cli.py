"""The `kiln` command: train, prepare, config, report, place, profile-routing."""
import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kiln.trainer.checkpoint import CheckpointError, check_compatible, drop_unfinished, latest_tag
from kiln.trainer.config import (ConfigError, check_vocab, did_you_mean, from_dict, load_recipe, reference_markdown,
                                 to_dict, to_yaml)


class _Strict(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kiln", description="kiln: efficient LLM pretraining", allow_abbrev=False)
    # no abbreviations: a typo such as --no-resum must not pass for --no-resume
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Strict)

    def with_recipe(name, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set train.steps=50 (repeatable)")
        return p

    t = with_recipe("train", "train a recipe (prepares data first when needed; resumes its run dir)")
    t.add_argument("--nproc", type=int, help="local ranks (overrides train.nproc)")
    t.add_argument("--no-resume", action="store_true",
                   help="start over: an existing run dir is moved aside, not deleted")
    with_recipe("prepare", "tokenise the recipe's corpus into indexed files (cached)")
    c = sub.add_parser("config", help="print the resolved recipe, or the recipe reference")
    c.add_argument("recipe", nargs="?", help="recipe YAML")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    c.add_argument("--reference", action="store_true", help="print every recipe key as a markdown table")
    r = sub.add_parser("report", help="summarise a run directory's metrics")
    r.add_argument("run_dir", help="e.g. runs/tiny")
    p = sub.add_parser("place", help="solve MoE expert placement (MoETuner ILP) from a run's routing profile",
                       description="Solve MoETuner's ILP on RUN_DIR's latest routing profile and write "
                                   "RUN_DIR/placement.json (apply it with --set train.placement=PATH).")
    p.add_argument("run_dir", help="e.g. runs/moe_tiny")
    p.add_argument("--ranks", type=int, help="expert-parallel ranks (default: the run's parallel.ep)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks span (default 1)")
    p.add_argument("--time-limit", type=float, default=60.0, help="solver seconds (default 60)")
    p.add_argument("--profile", help="routing profile .npz (default: RUN_DIR/profiles/routing_latest.npz)")
    p.add_argument("--strategy", default="ilp", choices=["ilp", "greedy_lpt", "round_robin", "contiguous"],
                   help="placement strategy (default ilp)")
    p.add_argument("--refine", action="store_true",
                   help="ilp: add kiln's stage 3, which cuts cross-rank traffic under a balance floor")
    p.add_argument("--min-balance", type=float, default=0.95,
                   help="with --refine: each layer keeps balancedness >= min(this, its ILP value)")
    g = sub.add_parser("profile-routing", help="profile MoE routing of a checkpoint on held-out data",
                       description="Route held-out batches through a checkpoint and save the per-layer "
                                   "expert loads and transition matrices under RUN_DIR/profiles/.")
    g.add_argument("path", help="run directory (newest checkpoint) or a checkpoint directory")
    g.add_argument("--batches", type=int, default=16, help="held-out batches to route (default 16)")
    g.add_argument("--out", help="write the profile here instead of RUN_DIR/profiles/")
    return ap


def _prepare(recipe, repair: bool = False):
    """Prepared data for the recipe; only `kiln prepare` repairs a corrupt cache."""
    from kiln.data.prepare import prepare

    writable_dir(recipe.data.cache_dir, "data.cache_dir")
    return prepare(recipe.data, progress=True, repair=repair)


def writable_dir(path, knob: str) -> None:
    """Create `path` if needed and check that a file can be written there, or name the knob."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{knob}={path} is not a writable folder ({e.strerror or e}): point {knob} "
                          f"at one (--set {knob}=DIR)") from None


def cmd_config(args) -> int:
    if args.reference:
        print(reference_markdown(), end="")
        return 0
    if not args.recipe:
        raise ConfigError("kiln config needs a recipe path (or --reference)")
    print(to_yaml(load_recipe(args.recipe, args.set)), end="")
    return 0


def cmd_prepare(args) -> int:
    p = _prepare(load_recipe(args.recipe, args.set), repair=True)
    print(f"kiln: data ready in {p.dir} ({p.train_tokens:,} train / {p.valid_tokens:,} held-out tokens)")
    return 0


def cmd_train(args) -> int:
    from kiln.trainer import launch

    recipe = load_recipe(args.recipe, args.set)
    if args.nproc is not None:
        recipe.train.nproc = args.nproc
        recipe = from_dict(to_dict(recipe))  # re-check combinations with the new rank count
    if recipe.train.placement not in ("contiguous", "auto"):  # a placement.json: check it fits
        from kiln.parallel.placement.io import PlacementResult

        PlacementResult.from_json(recipe.train.placement, recipe.model.moe_layers,
                                  recipe.model.moe.num_experts, recipe.parallel.ep)
    run_dir = Path(recipe.train.run_root) / recipe.train.name
    writable_dir(recipe.train.run_root, "train.run_root")
    launched = launch.in_launched_world()
    if not launched:
        if recipe.train.device == "cuda":  # before touching the run dir or preparing data
            launch.check_cuda(recipe.train.nproc)
        launch.claim_run_dir(run_dir)  # held until this process ends
    if latest_tag(run_dir) is not None:
        if args.no_resume:
            if os.environ.get("RANK", "0") == "0":  # in a launched world, rank 0 alone moves it
                aside = run_dir.with_name(f"{run_dir.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(str(run_dir), str(aside))
                print(f"kiln: --no-resume: moved the old run to {aside}")
        else:
            check_compatible(run_dir, to_dict(recipe))
            tag = latest_tag(run_dir)
            done = int(tag[5:]) if tag.startswith("step_") and tag[5:].isdigit() else None
            if done is not None and done >= recipe.train.steps:  # nothing to do: start no ranks
                print(f"kiln: {run_dir} already finished step {done} (train.steps={recipe.train.steps}): "
                      "raise train.steps to train on, or --no-resume to start over")
                return 0
            if os.environ.get("RANK", "0") == "0":  # once, also in a world srun/torchrun launched
                print(f"kiln: resuming {run_dir} from {tag} (--no-resume starts over)")
    if launched:
        return _train_in_world(recipe, run_dir)
    data = _prepare(recipe)
    check_vocab(recipe.model.vocab_size, data.vocab_size)  # here, not in every rank's traceback
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
    print(f"kiln: run dir {run_dir}, {recipe.train.nproc} local ranks", flush=True)
    started = time.time()
    rc = launch.launch_local(recipe.train.nproc, run_dir, data.dir, recipe.train.device)
    if rc != 0:  # every rank has exited: a save this run began and did not finish can go
        drop_unfinished(run_dir, started)
    if rc == 0:
        _print_where(run_dir, recipe)
    elif rc == 130:
        tag = latest_tag(run_dir)
        kept = f"the newest checkpoint, {tag}, is kept" if tag else "no checkpoint was saved yet"
        print(f"kiln: interrupted; {kept}: run the same command to resume", file=sys.stderr)
    return rc


def _train_in_world(recipe, run_dir: Path) -> int:
    """Under torchrun/srun: rank 0 prepares the data, then every rank trains."""
    import torch.distributed as dist

    from kiln.trainer.launch import init_distributed, pick_device
    from kiln.trainer.run import train

    init_distributed(pick_device(recipe), recipe.train.dist_timeout_s)
    # The other ranks wait for rank 0's data on the rendezvous store, not in a collective: a big
    # corpus takes longer to prepare than any collective timeout should be.
    store, key = dist.distributed_c10d._get_default_store(), "kiln/prepared"
    if dist.get_rank() == 0:
        try:
            data_dir = str(_prepare(recipe).dir)
        except BaseException:
            store.set(key, "")  # release the others; this rank reports the error
            raise
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
        store.set(key, data_dir)
    else:
        store.wait([key], datetime.timedelta(days=7))
        data_dir = store.get(key).decode()
        if not data_dir:
            return 2  # rank 0 printed why
    train(recipe, run_dir, Path(data_dir))
    if dist.get_rank() == 0:
        _print_where(run_dir, recipe)
    return 0


def _print_where(run_dir: Path, recipe) -> None:
    print(f"\nkiln: done. Run directory: {run_dir}")
    print(f"  checkpoints: {run_dir / 'checkpoints'} (newest: {latest_tag(run_dir)})")
    print(f"  metrics:     {run_dir / recipe.logging.metrics_file}  ->  kiln report {run_dir}")
    if recipe.logging.wandb.mode == "offline":
        print(f"  W&B offline: {run_dir / 'wandb'}  ->  wandb sync {run_dir / 'wandb'}/offline-run-*")


def cmd_report(args) -> int:
    from kiln.trainer.report import report

    try:
        print(report(Path(args.run_dir)))
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return 0


def cmd_place(args) -> int:
    from kiln.trainer.moe_tools import format_place, place_run

    if (args.ranks is not None and args.ranks < 2) or args.nodes < 1 or args.time_limit <= 0 \
            or not 0 <= args.min_balance <= 1:
        raise ConfigError("kiln place needs --ranks >= 2, --nodes >= 1, --time-limit > 0 "
                          "and 0 <= --min-balance <= 1")
    res, base, out = place_run(args.run_dir, args.ranks, args.nodes, args.time_limit, args.profile,
                               args.strategy, args.refine, args.min_balance)
    print(format_place(res, base, out))
    return 0


def cmd_profile_routing(args) -> int:
    from kiln.trainer.moe_tools import format_profile, profile_checkpoint

    if args.batches < 1:
        raise ConfigError("kiln profile-routing needs --batches >= 1")
    prof, saved, quality = profile_checkpoint(args.path, args.batches, args.out)
    print(format_profile(prof, saved, quality))
    return 0


def main(argv=None) -> int:
    """Console entry point; user errors print one line and return 2."""
    from kiln.data.errors import DataError, storage_message
    from kiln.parallel.placement.io import PlacementError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse alone says "unrecognized arguments"; name the option the user meant
        sub = parser._subparsers._group_actions[0].choices[args.cmd]
        options = [o for a in sub._actions for o in a.option_strings]
        hint = did_you_mean(extra[0].split("=")[0], options) if extra[0].startswith("-") else ""
        print(f"kiln: error: kiln {args.cmd} does not take {' '.join(extra)}{hint}: see kiln {args.cmd} --help",
              file=sys.stderr)
        return 2
    try:
        return {"train": cmd_train, "prepare": cmd_prepare, "config": cmd_config,
                "report": cmd_report, "place": cmd_place,
                "profile-routing": cmd_profile_routing}[args.cmd](args)
    except (ConfigError, DataError, CheckpointError, PlacementError) as e:
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
