"""Talking to Slurm through its commands: sbatch, sinfo, squeue, sacct, scontrol.

Every failure a user can cause or meet (no Slurm here, an unknown partition, sbatch refusing the
job) becomes a SlurmError of one line, with Slurm's own words.
"""
import re
import shutil
import subprocess

from kiln.slurm.config import time_seconds
from kiln.slurm.env import SlurmError


def run_slurm(cmd: list[str], timeout: float = 60) -> str:
    """Run a Slurm command; its stdout, or SlurmError with its first error line."""
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} is not on PATH: run kiln submit on a Slurm login node "
                         "(or use --dry-run to see the script)")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd[:2])} did not answer within {timeout:.0f} s: is slurmctld up? "
                         "(sinfo says)") from None
    if res.returncode != 0:
        said = (res.stderr.strip() or res.stdout.strip() or f"exit code {res.returncode}").splitlines()
        raise SlurmError(f"{cmd[0]} failed: {said[0]}")
    return res.stdout


def available() -> bool:
    """Whether this machine has Slurm's client commands."""
    return all(shutil.which(c) for c in ("sbatch", "sinfo", "squeue"))


def partitions() -> list[str]:
    """The cluster's partitions, the default one first."""
    names = [p.strip() for p in run_slurm(["sinfo", "-h", "-o", "%P"]).split()]
    return sorted({n.rstrip("*") for n in names}, key=lambda n: (f"{n}*" not in names, n))


def check_partition(name: str) -> None:
    """SlurmError naming the cluster's partitions when `name` is not one of them."""
    have = partitions()
    if name and name not in have:
        raise SlurmError(f"slurm.partition={name!r} is not a partition of this cluster (sinfo lists "
                         f"{', '.join(have) or 'none'}): --partition NAME")


def sbatch(script_path: str) -> str:
    """Submit a script; the job id."""
    out = run_slurm(["sbatch", "--parsable", str(script_path)])
    return out.strip().split(";")[0]


def time_left_s(job_id: str) -> int | None:
    """Seconds until the job's time limit (-1 = none), None if Slurm does not say."""
    try:
        out = run_slurm(["squeue", "-h", "-j", str(job_id), "-o", "%L"], timeout=20).strip()
    except SlurmError:
        return None
    return time_seconds(out) if out else None


def job_state(job_id: str) -> dict:
    """{"state", "reason", "restarts", "elapsed", "limit", "nodes"} of a job or array, from squeue
    (live jobs), else sacct (accounting), else scontrol (recently ended); {} if none knows it."""
    try:
        out = run_slurm(["squeue", "-h", "-j", str(job_id), "-o", "%i|%T|%r|%M|%l|%R"], timeout=20)
    except SlurmError:
        out = ""
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    if rows:
        states = sorted({r[1] for r in rows})
        return {"state": ",".join(states), "reason": rows[0][2], "elapsed": rows[0][3], "limit": rows[0][4],
                "nodes": rows[0][5], "tasks": len(rows), "source": "squeue"}
    if shutil.which("sacct"):
        try:
            out = run_slurm(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "JobID,State,Elapsed,Timelimit"],
                            timeout=20)
            rows = [line.split("|") for line in out.splitlines() if line.strip()]
            if rows:
                return {"state": ",".join(sorted({r[1].split()[0] for r in rows})), "elapsed": rows[0][2],
                        "limit": rows[0][3], "tasks": len(rows), "source": "sacct"}
        except SlurmError:
            pass  # accounting disabled: scontrol still remembers a recently ended job
    try:
        out = run_slurm(["scontrol", "show", "job", "-o", str(job_id)], timeout=20)
    except SlurmError:
        return {}
    rows = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]
    if not rows:
        return {}
    return {"state": ",".join(sorted({r.get("JobState", "?") for r in rows})), "reason": rows[0].get("Reason", ""),
            "restarts": rows[0].get("Restarts", ""), "elapsed": rows[0].get("RunTime", ""),
            "limit": rows[0].get("TimeLimit", ""), "tasks": len(rows), "source": "scontrol"}
