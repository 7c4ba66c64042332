"""`kiln train RECIPE`: check the recipe and the machine, make the run directory ready, prepare
the data, then start the local ranks (or, under torchrun/srun, be one of them)."""
import datetime
import sys
import time
from pathlib import Path

from kiln.trainer.checkpoint import latest_tag
from kiln.trainer.commands.common import prepare_data, print_where, with_recipe, writable_dir
from kiln.trainer.config import check_vocab, from_dict, load_recipe, to_dict, to_yaml
from kiln.trainer.run_dir import after_failed_launch, prepare_run_dir


def add_parser(sub) -> None:
    """Declare `kiln train`'s arguments."""
    t = with_recipe(sub, "train", "train a recipe (prepares data first when needed; resumes its run dir)")
    t.add_argument("--nproc", type=int, help="local ranks (overrides train.nproc)")
    t.add_argument("--no-resume", action="store_true",
                   help="start over: an existing run dir is moved aside, not deleted")


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
    if not prepare_run_dir(recipe, run_dir, args.no_resume, launched):
        return 0  # already finished: start no ranks
    if launched:
        return _train_in_world(recipe, run_dir)
    data = prepare_data(recipe)
    check_vocab(recipe.model.vocab_size, data.vocab_size)  # here, not in every rank's traceback
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
    print(f"kiln: run dir {run_dir}, {recipe.train.nproc} local ranks", flush=True)
    started = time.time()
    rc = launch.launch_local(recipe.train.nproc, run_dir, data.dir, recipe.train.device)
    if rc != 0:  # every rank has exited: a save this run began and did not finish can go
        after_failed_launch(run_dir, started)
    if rc == 0:
        print_where(run_dir, recipe)
    elif rc == 130:
        tag = latest_tag(run_dir)
        kept = f"the newest checkpoint, {tag}, is kept" if tag else "no checkpoint was saved yet"
        print(f"kiln: interrupted; {kept}: run the same command to resume", file=sys.stderr)
    return rc


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
