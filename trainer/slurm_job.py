"""`kiln train` as one rank of a `kiln submit` job (an srun task): the rendezvous preflight, the
stop signals, and the stop file the batch script's requeue step reads (kiln.slurm.requeue)."""
import os

from kiln.slurm.env import SlurmError, in_slurm_step, preflight
from kiln.trainer.config import ConfigError


def join(recipe) -> None:
    """Before torch.distributed: note slurm.signal and SIGTERM (stop at the next step boundary,
    kiln.trainer.hooks.stop) and check the rendezvous, each problem one line."""
    if not in_slurm_step():
        return
    from kiln.trainer.hooks import stop

    stop.install(sorted({recipe.slurm.signal.upper().removeprefix("SIG"), "TERM"}))
    try:
        preflight(os.environ)
    except SlurmError as e:
        raise ConfigError(str(e)) from None


def after_train(run_dir, finished: bool, rank: int) -> None:
    """Rank 0 of a run a signal stopped: say where, for the requeue step."""
    if finished or rank != 0 or not in_slurm_step():
        return
    from kiln.slurm.requeue import write_stop
    from kiln.trainer.checkpoint import latest_tag
    from kiln.trainer.hooks.stop import asked

    tag = latest_tag(run_dir) or "step_0"
    write_stop(run_dir, asked() or "TERM", int(tag[5:]) if tag[5:].isdigit() else 0)
    print(f"kiln: stopped by SIG{asked()} after {tag} (checkpoint saved)", flush=True)
