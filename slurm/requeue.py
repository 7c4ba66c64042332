"""After srun returns, in the batch script: `python -m kiln.slurm.requeue RUN_DIR RC`.

When the ranks stopped on Slurm's signal they saved a checkpoint and wrote RUN_DIR/slurm/stop.json.
This requeues the job (`scontrol requeue`) so that it resumes from that checkpoint, within two
budgets counted apart in RUN_DIR/slurm/requeues.json: a signal close to the time limit is a
timeout (a run longer than one job), any other is a preemption. A run that reached its last step
writes no stop.json and is not requeued. The requeue runs here, after every rank has exited,
so that nothing is killed mid-write.
"""
import json
import os
import sys
import time
from pathlib import Path

from kiln.slurm.env import SlurmError
from kiln.slurm.jobs import run_slurm, time_left_s

MARGIN_S = 30  # a signal this close to (lead time before) the end counts as the time limit


def stop_file(run_dir) -> Path:
    return Path(run_dir) / "slurm" / "stop.json"


def write_stop(run_dir, signal_name: str, step: int) -> None:
    """Rank 0, after the stop checkpoint: what stopped the run, and where."""
    f = stop_file(run_dir)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"signal": signal_name, "step": step, "time": time.time(),
                             "job": os.environ.get("SLURM_JOB_ID", "")}))


def classify(time_left: int | None, lead_s: int) -> str:
    """"timeout" when the job is at its time limit (the signal came with the lead time), else
    "preemption" (the signal came early: the scheduler, or a user's scancel --signal)."""
    if time_left is None or time_left < 0:  # no limit known: only preemption can stop it early
        return "preemption"
    return "timeout" if time_left <= lead_s + MARGIN_S else "preemption"


def decide(run_dir, time_left: int | None, lead_s: int, budgets: dict) -> tuple[str, str]:
    """("requeue" | "finish" | "stop", one line saying why); counts a requeue it allows."""
    f = stop_file(run_dir)
    if not f.is_file():
        return "finish", "kiln: no stop was asked: not requeued"
    stop = json.loads(f.read_text())
    f.unlink()
    if stop["signal"] == "TERM":  # scancel, or the scheduler's own preemption: Slurm decides
        return "stop", (f"kiln: stopped by SIGTERM at step {stop['step']} (checkpoint saved); Slurm "
                        "requeues a preempted job itself, a cancelled one stays cancelled")
    reason = classify(time_left, lead_s)
    counts_file = Path(run_dir) / "slurm" / "requeues.json"
    counts = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    used, limit = counts.get(reason, 0), budgets[reason]
    if used >= limit:
        return "stop", (f"kiln: {reason} at step {stop['step']}: not requeued, {used} {reason} requeues "
                        f"used (slurm.max_requeues_{'preempt' if reason == 'preemption' else 'timeout'}"
                        f"={limit}); the checkpoint is kept: `kiln submit` again to continue")
    counts[reason] = used + 1
    counts_file.write_text(json.dumps(counts))
    return "requeue", (f"kiln: {reason} at step {stop['step']} (SIG{stop['signal']}): requeue "
                       f"{used + 1} of {limit}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir, rc = Path(argv[0]), int(argv[1])
    job = os.environ.get("SLURM_JOB_ID", "")
    lead = int(os.environ.get("KILN_SIGNAL_LEAD_S", "0"))
    budgets = {"preemption": int(os.environ.get("KILN_MAX_REQUEUES_PREEMPT", "20")),
               "timeout": int(os.environ.get("KILN_MAX_REQUEUES_TIMEOUT", "5"))}
    action, line = decide(run_dir, time_left_s(job) if job else None, lead, budgets)
    if action == "finish":
        return rc  # the run's own exit code: 0 finished, else it failed (see the log above)
    print(line, flush=True)
    if action == "requeue":
        try:
            run_slurm(["scontrol", "requeue", job])  # Slurm ends this script now; the job goes pending
        except SlurmError as e:  # e.g. requeue disabled for this partition: the checkpoint is kept
            print(f"kiln: error: {e}; the checkpoint is kept: `kiln submit` again to continue", flush=True)
            return 1
        time.sleep(60)  # (not reached in practice) wait to be ended rather than finish the job
    return 0


if __name__ == "__main__":
    sys.exit(main())
