"""`kiln submit RECIPE`: train a recipe as a Slurm batch job (or an array job, with --sweep).

Every check runs before anything is submitted: the recipe with its overrides and flags, each
sweep point, the partition (sinfo). Then the resolved recipe and the sbatch script (kiln.slurm.
sbatch) go into the run dir, sbatch submits it, and one line each says the job id, the run dir
and the log.
"""
import dataclasses
import json
import math
import sys
from pathlib import Path

from kiln.slurm import jobs
from kiln.slurm.env import SlurmError
from kiln.slurm.sbatch import JobSpec, render
from kiln.slurm.sweep import grid, parse_sweeps, point_name
from kiln.trainer.commands.common import with_recipe, writable_dir
from kiln.trainer.config import ConfigError, load_recipe, to_yaml

# flag -> slurm key; each overrides the recipe's slurm: section
FLAGS = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
         "partition": "partition", "time": "time", "account": "account", "qos": "qos"}


def add_parser(sub) -> None:
    """Declare `kiln submit`'s arguments."""
    p = with_recipe(sub, "submit", "train a recipe as a Slurm batch job (an array job with --sweep)")
    p.add_argument("--nodes", type=int, help="nodes (slurm.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, one rank each (slurm.gpus_per_node)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per rank (slurm.cpus_per_task)")
    p.add_argument("--partition", help="partition (slurm.partition)")
    p.add_argument("--time", help="time limit per job, e.g. 04:00:00 (slurm.time)")
    p.add_argument("--account", help="account (slurm.account)")
    p.add_argument("--qos", help="quality of service (slurm.qos)")
    p.add_argument("--dependency", default="", help="sbatch dependency, e.g. afterok:1234")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one array task per point of the grid of these values (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")


def run(args) -> int:
    """Check everything, write the run dir(s) and the script, submit; print where things are."""
    try:
        return _submit(args)
    except SlurmError as e:
        raise ConfigError(str(e)) from None


def _overrides(args) -> list[str]:
    out = list(args.set)
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if isinstance(value, int) and value < (1 if flag == "nodes" else 0):
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= {1 if flag == 'nodes' else 0}, got {value}")
        out.append(f"slurm.{key}={json.dumps(value)}")  # quoted: --time 90 stays the string "90"
    return out


def _submit(args) -> int:
    overrides = _overrides(args)
    base = load_recipe(args.recipe, overrides)
    sweeps = parse_sweeps(args.sweep)
    points = grid(sweeps) if sweeps else [[]]
    tasks = base.slurm.gpus_per_node or base.train.nproc  # ranks per node
    per_node = [f"train.nproc={tasks}"]  # the sp / ep checks count the ranks of one node
    run_root = Path(base.train.run_root).resolve()
    recipes = []
    for i, point in enumerate(points):
        extra = per_node + point
        if sweeps:  # each point its own run dir and W&B run, grouped under the sweep's name
            extra += [f"train.run_root={run_root / base.train.name}", f"train.name={point_name(i, point)}",
                      f"logging.wandb.group={base.train.name}"]
        else:
            extra.append(f"train.run_root={run_root}")
        try:
            recipe = load_recipe(args.recipe, overrides + extra)
        except ConfigError as e:
            raise ConfigError(f"--sweep {' '.join(point)}: {e}" if point else str(e)) from None
        if not recipe.train.name:
            recipe.train.name = base.train.name
        recipes.append(recipe)
    s = base.slurm
    if jobs.available():  # on a login node: the partition must exist (dry runs elsewhere skip it)
        jobs.check_partition(s.partition)
    elif not args.dry_run:
        raise SlurmError("sbatch is not on PATH: run kiln submit on a Slurm login node "
                         "(or --dry-run to see the script)")
    run_dirs = [Path(r.train.run_root) / r.train.name for r in recipes]
    home = run_root / base.train.name  # the run dir, or the sweep's folder holding the points' dirs
    _refuse_live_job(home)
    lead, how = lead_time(base, home, s.nodes)
    job = JobSpec(job_name=base.train.name, run_dirs=[str(d) for d in run_dirs], workdir=str(Path.cwd()),
                  python=sys.executable, log_dir=str(home), nodes=s.nodes, tasks_per_node=tasks,
                  gpus_per_node=s.gpus_per_node, cpus_per_task=s.cpus_per_task, time=s.time,
                  partition=s.partition, account=s.account, qos=s.qos, dependency=args.dependency,
                  signal=s.signal, lead_s=lead, export=s.export, master_addr=s.master_addr,
                  max_requeues_preempt=s.max_requeues_preempt, max_requeues_timeout=s.max_requeues_timeout,
                  script=str(home / "slurm" / "job.sbatch"))
    script = render(job)
    if args.dry_run:
        print(script, end="")
        print(f"# kiln: dry run: nothing written or submitted; signal lead {lead} s ({how})", file=sys.stderr)
        return 0
    writable_dir(run_root, "train.run_root")
    for recipe, run_dir in zip(recipes, run_dirs):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
    (home / "slurm").mkdir(parents=True, exist_ok=True)
    Path(job.script).write_text(script)
    if sweeps:
        (home / "sweep.json").write_text(json.dumps({"sweep": base.train.name, "points": [
            {"index": i, "overrides": p, "run_dir": str(d)} for i, (p, d) in enumerate(zip(points, run_dirs))]},
            indent=1))
    job_id = jobs.sbatch(job.script)
    (home / "slurm" / "job_id").write_text(job_id + "\n")
    log = job.output.replace("%j", job_id).replace("%A", job_id)
    print(f"kiln: submitted job {job_id}" + (f" (array of {len(run_dirs)}: {', '.join(d.name for d in run_dirs)})"
                                             if sweeps else ""))
    print(f"  run dir: {home}")
    print(f"  log:     {log.replace('%a', '<task>') if sweeps else log}")
    print(f"  signal:  SIG{s.signal.upper().removeprefix('SIG')} {lead} s before the time limit ({how})")
    print(f"  status:  kiln status {home}")
    return 0


def _refuse_live_job(home: Path) -> None:
    """Two jobs on one run dir would interleave metrics and overwrite each other's checkpoints
    (the ranks of a job do not lock it: they are many)."""
    f = home / "slurm" / "job_id"
    if f.is_file() and jobs.available():
        job = f.read_text().strip()
        state = jobs.job_state(job)
        if state.get("source") == "squeue":  # squeue lists only live jobs (pending, running, requeued)
            raise ConfigError(f"{home} is already submitted as job {job} ({state['state']}): wait for it, "
                              f"scancel {job}, or set another train.name")


def lead_time(recipe, run_dir: Path, nodes: int) -> tuple[int, str]:
    """Seconds before the time limit that Slurm signals: slurm.signal_lead_s, or 3 x the run's
    measured checkpoint time plus 2 steps (RUN_DIR/slurm/timing.json, written by the ranks), or
    before any save an estimate from the model's size; never under 60 s."""
    if recipe.slurm.signal_lead_s:
        return recipe.slurm.signal_lead_s, "slurm.signal_lead_s"
    timing = run_dir / "slurm" / "timing.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        measured = 3 * t["checkpoint_s"] + 2 * t["step_s"]
        return max(60, math.ceil(measured)), f"3 x the measured checkpoint time {t['checkpoint_s']:.1f} s + 2 steps"
    from kiln.model import param_count

    cfg = recipe.model
    if not cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=recipe.data.vocab_size)
    # weights, Adam's two moments and the fp32 master copy: 16 bytes a parameter, at ~1 GB/s a node
    estimate = 16 * param_count(cfg) / (1e9 * nodes)
    return max(60, math.ceil(3 * estimate)), f"no checkpoint measured yet: 3 x {estimate:.1f} s estimated"
