"""`kiln status RUN_DIR`: a submitted run's Slurm state, its latest metrics and its ETA."""
import json
from pathlib import Path

from kiln.slurm import jobs
from kiln.slurm.env import SlurmError
from kiln.trainer.config import ConfigError


def add_parser(sub) -> None:
    """Declare `kiln status`'s arguments."""
    p = sub.add_parser("status", help="a submitted run's Slurm state, latest metrics and ETA")
    p.add_argument("run_dir", help="the run dir kiln submit printed (a sweep's folder too)")


def run(args) -> int:
    home = Path(args.run_dir)
    job_file = home / "slurm" / "job_id"
    if not job_file.is_file():
        raise ConfigError(f"{home} has no slurm/job_id: is it a run dir that kiln submit printed?")
    job_id = job_file.read_text().strip()
    try:
        state = jobs.job_state(job_id) if jobs.available() else {}
    except SlurmError as e:
        raise ConfigError(str(e)) from None
    if state:
        extra = "".join(f", {k} {state[k]}" for k in ("reason", "restarts", "elapsed", "limit") if state.get(k))
        print(f"job {job_id}: {state['state']}{extra} ({state['source']})")
    else:
        print(f"job {job_id}: unknown to Slurm here (ended long ago, or another cluster)")
    counts = home / "slurm" / "requeues.json"
    if counts.is_file():
        print(f"  requeues: {json.loads(counts.read_text())}")
    sweep = home / "sweep.json"
    run_dirs = [Path(p["run_dir"]) for p in json.loads(sweep.read_text())["points"]] if sweep.is_file() else [home]
    for run_dir in run_dirs:
        print(("  " if sweep.is_file() else "") + progress_line(run_dir))
    return 0


def progress_line(run_dir: Path) -> str:
    """"<name>: step S/N, loss L, ETA h:mm:ss" from the run's metrics and recipe."""
    import yaml

    from kiln.trainer.monitor import fmt_eta
    from kiln.trainer.metrics import read_metrics

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").is_file() else {}
    steps = recipe.get("train", {}).get("steps", 0)
    path = run_dir / recipe.get("logging", {}).get("metrics_file", "metrics.jsonl")
    train = [r for r in read_metrics(path) if "train/loss" in r] if path.is_file() else []
    if not train:
        return f"{run_dir.name}: no steps logged yet"
    last = train[-1]
    eta = (steps - last["step"]) * last.get("perf/step_s", 0.0)
    done = "done" if last["step"] >= steps else f"ETA {fmt_eta(eta)} at {last.get('perf/step_s', 0):.3f} s/step"
    return f"{run_dir.name}: step {last['step']}/{steps}, loss {last['train/loss']:.4f}, {done}"
