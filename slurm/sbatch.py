"""The sbatch script of a kiln job: the template, and render() that fills it from a JobSpec.

The script holds no secret: variables such as WANDB_API_KEY reach the job by name through
`--export`, so their values stay in the submitting shell's environment and slurmctld.
"""
import shlex
from dataclasses import dataclass, field
from string import Template

TEMPLATE = Template("""\
#!/bin/bash
# Written by `kiln submit`; resubmit with `sbatch $script`.
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
$resources#SBATCH --time=$time
#SBATCH --output=$output
#SBATCH --open-mode=append
#SBATCH --chdir=$workdir
#SBATCH --requeue
#SBATCH --signal=$signal@$lead_s
#SBATCH --export=$export
$array
# srun's tasks are the ranks; kiln train reads rank, world and rendezvous from SLURM_*. A requeued
# job runs this script again and kiln train resumes from the newest checkpoint in the run dir.
$select_run
$env
echo "kiln: job $${SLURM_JOB_ID} (restart $${SLURM_RESTART_COUNT:-0}) on $${SLURM_JOB_NODELIST}, run dir $$RUN_DIR"
srun --kill-on-bad-exit=1 $python -m kiln.trainer.cli train "$$RUN_DIR/recipe.yaml"
rc=$$?
# after a stop signal the ranks saved a checkpoint and wrote $$RUN_DIR/slurm/stop.json: requeue
# (within slurm.max_requeues_*), or finish
exec $python -m kiln.slurm.requeue "$$RUN_DIR" "$$rc"
""")


@dataclass
class JobSpec:
    """Everything the script needs; run_dirs has one entry, or one per array task (a sweep)."""

    job_name: str
    run_dirs: list[str]
    workdir: str
    python: str
    log_dir: str
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 0
    time: str = "01:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    dependency: str = ""
    signal: str = "USR1"
    lead_s: int = 120
    export: list[str] = field(default_factory=list)
    master_addr: str = ""
    max_requeues_preempt: int = 20
    max_requeues_timeout: int = 5
    script: str = ""

    @property
    def output(self) -> str:
        """The log file pattern: one per job, or per array task."""
        name = "slurm-%A_%a.out" if len(self.run_dirs) > 1 else "slurm-%j.out"
        return f"{self.log_dir}/{name}"


def render(job: JobSpec) -> str:
    """The sbatch script text for `job`."""
    opts = [("partition", job.partition), ("account", job.account), ("qos", job.qos),
            ("dependency", job.dependency)]
    lines = [f"#SBATCH --{k}={v}\n" for k, v in opts if v]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}\n")
    if job.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}\n")
    if len(job.run_dirs) > 1:
        dirs = " ".join(shlex.quote(d) for d in job.run_dirs)
        array = f"#SBATCH --array=0-{len(job.run_dirs) - 1}"
        select = f"RUN_DIRS=({dirs})\nRUN_DIR=${{RUN_DIRS[$SLURM_ARRAY_TASK_ID]}}"
    else:
        array, select = "", f"RUN_DIR={shlex.quote(job.run_dirs[0])}"
    env = ["export PYTHONUNBUFFERED=1 KILN_SRUN_RANKS=1  # each srun task is one rank"]
    if not job.gpus_per_node:
        env.append("export DS_ACCELERATOR=cpu  # CPU ranks: DeepSpeed's CPU accelerator, gloo")
    else:
        env.append("export NCCL_ASYNC_ERROR_HANDLING=1  # a failed peer ends the step, not a hang")
    env.append(f"export KILN_SIGNAL_LEAD_S={job.lead_s} KILN_MAX_REQUEUES_PREEMPT={job.max_requeues_preempt} "
               f"KILN_MAX_REQUEUES_TIMEOUT={job.max_requeues_timeout}")
    if job.master_addr:
        env.append(f"export KILN_MASTER_ADDR={shlex.quote(job.master_addr)}")
    # the job's own environment (ALL) plus, by name, the variables that must reach it
    export = ",".join(["ALL", *job.export])
    return TEMPLATE.substitute(
        script=job.script or "SCRIPT", job_name=job.job_name, nodes=job.nodes,
        tasks_per_node=job.tasks_per_node, resources="".join(lines), time=job.time, output=job.output,
        workdir=shlex.quote(job.workdir), signal=job.signal.upper().removeprefix("SIG"), lead_s=job.lead_s,
        export=export, array=array, select_run=select, env="\n".join(env), python=shlex.quote(job.python))
