"""`kiln train RECIPE`: check the recipe and the machine, make the run directory ready, prepare
the data, then start the local ranks (or, under torchrun/srun, be one of them)."""
import datetime
import sys
import time
from pathlib import Path

from kiln.trainer.checkpoint import latest_tag
from kiln.trainer.commands.common import prepare_data, print_where, with_recipe, writable_dir
from kiln.trainer.commands.console_log import ConsoleLog, note_error
from kiln.trainer.config import ConfigError, check_vocab, from_dict, load_recipe, to_dict, to_yaml
from kiln.trainer.run_dir import after_failed_launch, prepare_run_dir


def add_parser(sub) -> None:
    """Declare `kiln train`'s arguments."""
    t = with_recipe(sub, "train", "train a recipe (prepares data first when needed; resumes its run dir)")
    t.add_argument("--nproc", type=int, help="local ranks (overrides train.nproc)")
    t.add_argument("--no-resume", action="store_true",
                   help="start over: an existing run dir is moved aside, not deleted")
    t.add_argument("--no-memory-check", action="store_true",
                   help="start even when the estimated training memory exceeds this machine's")


def run(args) -> int:
    """Train; the cheap checks come first, so a mistake costs no data preparation and no ranks."""
    from kiln.trainer import launch

    recipe = load_recipe(args.recipe, args.set)
    if args.nproc is not None:
        recipe.train.nproc = args.nproc
        recipe = from_dict(to_dict(recipe))  # re-check combinations with the new rank count
    if recipe.parallel.placement not in ("contiguous", "auto"):  # a placement.json: check it fits
        from kiln.parallel.placement.io import PlacementResult

        PlacementResult.from_json(recipe.parallel.placement, recipe.model.moe_layers,
                                  recipe.model.moe.num_experts, recipe.parallel.ep)
    run_dir = Path(recipe.train.run_root) / recipe.train.name
    writable_dir(recipe.train.run_root, "train.run_root")
    launched = launch.in_launched_world()
    if not launched and recipe.train.device == "cuda":  # before touching the run dir or preparing data
        launch.check_cuda(recipe.train.nproc)
    resumed = run_dir.is_dir() and not launched
    try:
        return _prepare_and_launch(args, recipe, run_dir, launched)
    except Exception as e:  # a refused resume goes into the run's console log too
        if resumed and not args.no_resume:
            note_error(run_dir, e)
        raise


def _prepare_and_launch(args, recipe, run_dir: Path, launched: bool) -> int:
    from kiln.trainer import launch

    if not prepare_run_dir(recipe, run_dir, args.no_resume, launched):
        return 0  # already finished: start no ranks
    if launched:
        return _train_in_world(recipe, run_dir)
    if not args.no_memory_check:
        check_memory(recipe)
    data = prepare_data(recipe)
    check_vocab(recipe.model.vocab_size, data.vocab_size)  # here, not in every rank's traceback
    run_dir.mkdir(parents=True, exist_ok=True)
    with ConsoleLog(run_dir):
        (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
        # the ranks import DeepSpeed and build the model and the engine before the first step's line:
        # tens of seconds with no output otherwise
        print(f"kiln: run dir {run_dir}, {recipe.train.nproc} local ranks; starting them (importing "
              "DeepSpeed, building the model and the engine: the first step can take a while)", flush=True)
        started = time.time()
        rc = launch.launch_local(recipe.train.nproc, run_dir, data.dir, recipe.train.device)
        if rc != 0:  # every rank has exited: a save this run began and did not finish can go
            after_failed_launch(run_dir, started)
        if rc == 0 and _finished(run_dir, recipe):  # not after a signal's stop at a checkpoint
            print_where(run_dir, recipe)
        elif rc == 130:
            tag = latest_tag(run_dir)
            kept = f"the newest checkpoint, {tag}, is kept" if tag else "no checkpoint was saved yet"
            print(f"kiln: interrupted; {kept}: run the same command to resume", file=sys.stderr)
    return rc


def check_memory(recipe) -> None:
    """Refuse, in one line, a recipe whose estimated training memory (weights, grads, AdamW moments,
    activations: kiln.model.flops.train_memory_bytes) exceeds this machine's: the ranks would
    otherwise be killed by the OOM killer, or trace, after minutes of data preparation."""
    import dataclasses

    from kiln.model.flops import train_memory_bytes
    from kiln.trainer.stages import resolved_vocab

    r = recipe
    model = dataclasses.replace(r.model, vocab_size=resolved_vocab(r))
    per_rank = train_memory_bytes(model, r.train.micro_batch, r.data.seq_len, r.train.nproc // r.parallel.sp,
                                  r.parallel.zero_stage, r.parallel.ep)
    need = sum(per_rank.values())
    have, where = _device_memory(r.train.device)
    if have is None:
        return
    if where == "this machine":  # CPU ranks share it
        need *= r.train.nproc
    if need > have:
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in per_rank.items())
        raise ConfigError(f"the model ({model.dim=}, {model.n_layers=}) needs about {need / 2**30:,.1f} GiB to "
                          f"train ({r.train.nproc} ranks x [{parts}] GiB), more than the {have / 2**30:,.1f} GiB "
                          f"of {where}: shrink model.dim / n_layers / train.micro_batch / data.seq_len, raise "
                          "parallel.zero_stage, or pass --no-memory-check to start anyway")


def _device_memory(device: str) -> tuple[int | None, str]:
    """(bytes, what): one GPU's memory when the ranks use CUDA, else the machine's (cgroup limit included)."""
    import os

    from kiln.trainer.launch import cuda_available

    if device != "cpu" and cuda_available():
        import torch

        return torch.cuda.get_device_properties(0).total_memory, "one GPU"
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None, ""
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            have = min(have, int(text))
    return have, "this machine"


def _finished(run_dir: Path, recipe) -> bool:
    """Whether the newest checkpoint is the run's last step (a SIGTERM/SIGUSR1 stop exits 0 earlier)."""
    from kiln.trainer.checkpoint import saved_state

    try:
        state = saved_state(run_dir) or {}
    except Exception:  # noqa: BLE001 - the closing lines are a courtesy; the ranks reported any damage
        return True
    return int(state.get("progress", {}).get("step", recipe.train.steps)) >= recipe.train.steps


def _train_in_world(recipe, run_dir: Path) -> int:
    """Under torchrun/srun: rank 0 prepares the data, then every rank trains."""
    import torch.distributed as dist

    from kiln.trainer import slurm_job
    from kiln.trainer.launch import init_distributed, pick_device
    from kiln.trainer.run import train

    slurm_job.join(recipe)  # in a `kiln submit` job: stop signals, rendezvous preflight
    init_distributed(pick_device(recipe), recipe.train.dist_timeout_s)
    # The other ranks wait for rank 0's data on the rendezvous store, not in a collective: a big
    # corpus takes longer to prepare than any collective timeout should be.
    store, key = dist.distributed_c10d._get_default_store(), "kiln/prepared"
    if dist.get_rank() == 0:
        try:
            data_dir = str(prepare_data(recipe).dir)
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
    finished = train(recipe, run_dir, Path(data_dir))
    slurm_job.after_train(run_dir, finished, dist.get_rank())
    if finished and dist.get_rank() == 0:
        print_where(run_dir, recipe)
    return 0
