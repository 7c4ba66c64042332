"""The run directory of `kiln train` (runs/<train.name>): one trainer at a time on it, resume it or
move it aside, and tidy it after a failed launch. `kiln train` decides when; this module knows how."""
import os
import shutil
import socket
import time
from pathlib import Path

from kiln.trainer.checkpoint import (CheckpointError, check_compatible, ckpt_root, drop_unfinished, latest_tag,
                                     saved_recipe)
from kiln.trainer.config import ConfigError, to_dict
from kiln.trainer.optim import schedule_change

# the files every finished kiln checkpoint holds (DeepSpeed's model states, kiln's recipe and state)
COMPLETE = ("mp_rank_00_model_states.pt", "kiln_recipe.yaml", "kiln_state.json")
_CLAIMS = []  # open lock files: a lock lasts as long as this process (the OS drops it on any exit)


def claim_run_dir(run_dir: Path) -> None:
    """Refuse a second `kiln train` on the same run directory while one is running (two would
    interleave metrics and overwrite each other's checkpoints). The lock file sits beside the
    run dir, so that --no-resume can move the old run aside under the lock."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    f = open(run_dir.parent / f".{run_dir.name}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"{run_dir} is in use by another kiln train ({holder}): wait for it to "
                          "finish or stop it, or set another train.name") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    _CLAIMS.append(f)


def prepare_run_dir(recipe, run_dir: Path, no_resume: bool, launched: bool) -> bool:
    """Make `run_dir` ready for this run; False when there is nothing to do (its newest checkpoint
    already reached train.steps), so that no rank is started.

    Started by hand, this process locks the directory first (held until it ends). In a world
    torchrun/srun `launched`, every rank runs this: none locks (they would refuse each other), and
    rank 0 alone moves an old run aside or says it resumes, so the move and the line happen once.
    A checkpoint of another model shape is refused before anything is resumed or started."""
    if not launched:
        claim_run_dir(run_dir)
    from kiln.trainer.manifest import resume_tag

    # the checkpoint its manifest verifies (a missing `latest`, checkpoint.fallback: kiln.trainer.manifest)
    tag = latest_tag(run_dir) if no_resume else resume_tag(run_dir, recipe.checkpoint.fallback,
                                                           say=print if _rank0() else lambda _: None)
    orphans = sorted(d.name for d in ckpt_root(run_dir).glob("step_*") if d.is_dir()) if tag is None else []
    if tag is None and not orphans:
        return True
    complete = [t for t in orphans if _complete_unverified(ckpt_root(run_dir) / t)]
    if complete and not no_resume:
        # Starting at step 0 here would overwrite these checkpoints and the metrics history. (Only
        # unfinished first saves, say of a run killed with -9, start over as before.)
        raise CheckpointError(f"{ckpt_root(run_dir)} holds checkpoints but no `latest` file; the newest complete one "
                              f"is {complete[-1]}: write that name into {ckpt_root(run_dir) / 'latest'} to resume from "
                              "it, or pass --no-resume to move the run aside and start over")
    if tag is None and not no_resume:
        return True
    if no_resume:
        if _rank0():
            aside = run_dir.with_name(f"{run_dir.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(run_dir), str(aside))  # aside, not deleted: a mistyped flag costs nothing
            print(f"kiln: --no-resume: moved the old run to {aside}")
        return True
    check_compatible(run_dir, to_dict(recipe))
    done = int(tag[5:]) if tag.startswith("step_") and tag[5:].isdigit() else None
    if done is not None and done >= recipe.train.steps:
        print(f"kiln: {run_dir} already finished step {done} (train.steps={recipe.train.steps}): "
              "raise train.steps to train on, or --no-resume to start over")
        return False
    if _rank0():
        print(f"kiln: resuming {run_dir} from {tag} (--no-resume starts over)")
        if done is not None and (line := schedule_change(saved_recipe(run_dir) or {}, recipe, done)):
            print(line)
    return True


def _complete_unverified(tag_dir: Path) -> bool:
    """A folder that an older kiln (one without manifests) finished: its files are all there. A
    folder of today's kiln without a verified manifest is an unfinished save (a kill before the
    manifest): resume_tag found no verified checkpoint, so such a run starts over. The recipe saved
    with it tells them apart: today's has checkpoint.fallback, a knob older kilns did not know."""
    import yaml

    if not all((tag_dir / f).is_file() for f in COMPLETE):
        return False
    try:
        saved = yaml.safe_load((tag_dir / "kiln_recipe.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("checkpoint"), dict):
        return True  # unreadable: keep the old guard, the user decides
    return "fallback" not in saved["checkpoint"]


def after_failed_launch(run_dir: Path, started: float) -> None:
    """Once every local rank has exited after a failure: remove the checkpoint folders this run
    (begun at `started`) began and did not finish. The failing rank alone cannot: another rank may
    still be writing into the same folder."""
    drop_unfinished(run_dir, started)


def _rank0() -> bool:
    """Rank 0 of a launched world, or a process no launcher started (no RANK set)."""
    return os.environ.get("RANK", "0") == "0"
