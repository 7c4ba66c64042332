"""The recipe's `slurm:` section: the allocation a cluster job asks for, and how it is stopped and
requeued (`kiln submit`, docs/slurm.md)."""
import re
import signal as _signal
from dataclasses import dataclass, field

# sbatch's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, and no limit
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def time_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit ("90", "1:30:00", "2-00:00:00"), -1 for no limit, None if the
    text is not one."""
    text = str(text).strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return -1
    m = _TIME.match(text)
    if not m:
        return None
    d, dh, dm, ds, a, b, c = (int(g) if g else 0 for g in m.groups())
    if m.group(1) is not None:  # days-hours[:minutes[:seconds]]
        return ((d * 24 + dh) * 60 + dm) * 60 + ds
    if m.group(7) is not None:  # hours:minutes:seconds
        return (a * 60 + b) * 60 + c
    return a * 60 + b  # minutes[:seconds]


def signal_number(name: str) -> int | None:
    """The number of a signal name ("USR1", "SIGUSR1", "10"), None if there is no such signal."""
    name = str(name).upper().removeprefix("SIG")
    if name.isdigit():
        return int(name) if 0 < int(name) < _signal.NSIG else None
    return getattr(_signal, f"SIG{name}", None)


@dataclass
class SlurmConfig:
    """Resources for a Slurm allocation, and the preemption / time-limit policy of its job."""

    partition: str = field(default="", metadata={"help": "Slurm partition (empty = cluster default)"})
    nodes: int = field(default=1, metadata={"help": "nodes to allocate", "min": 1})
    gpus_per_node: int = field(default=0, metadata={
        "help": "GPUs per node, one rank each (0 = CPU ranks: train.nproc per node)", "min": 0})
    cpus_per_task: int = field(default=0, metadata={
        "help": "CPUs per rank (0 = the cluster's default)", "min": 0, "zero": "0 = the cluster's default"})
    time: str = field(default="01:00:00", metadata={
        "help": "wall-clock limit per job (a requeued job gets it anew): M, H:M:S or D-H:M:S"})
    account: str = field(default="", metadata={"help": "Slurm account to charge (empty = default)"})
    qos: str = field(default="", metadata={"help": "quality of service (empty = default)"})
    signal: str = field(default="USR1", metadata={
        "help": "signal Slurm sends ahead of the time limit (sbatch --signal); kiln then checkpoints at "
                "the next step and requeues. Use another (e.g. USR2) where NCCL claims USR1"})
    signal_lead_s: int = field(default=0, metadata={
        "help": "seconds before the time limit the signal comes; 0 = 3 x the run's measured checkpoint "
                "time plus 2 steps, at least 60 (estimated from the model size before the first save)",
        "min": 0, "zero": "0 = from the measured checkpoint time"})
    max_requeues_preempt: int = field(default=20, metadata={
        "help": "requeues after a preemption (the signal well before the time limit)", "min": 0})
    max_requeues_timeout: int = field(default=5, metadata={
        "help": "requeues at the time limit (a run longer than one job's time)", "min": 0})
    master_addr: str = field(default="", metadata={
        "help": "rendezvous address; empty = the first host of SLURM_JOB_NODELIST. Set it where node "
                "names do not resolve; a loopback address passes the preflight only when set here"})
    export: list[str] = field(default_factory=lambda: ["WANDB_API_KEY", "HF_TOKEN"], metadata={
        "help": "environment variables the job gets by name (sbatch --export), never written into "
                "the script"})

    def validate(self) -> None:
        if time_seconds(self.time) is None:
            raise ValueError(f"slurm.time={self.time!r} is not a Slurm time limit: use minutes (90), "
                             "H:M:S (01:30:00) or D-H:M:S (2-00:00:00)")
        if signal_number(self.signal) is None:
            raise ValueError(f"slurm.signal={self.signal!r} is not a signal name: e.g. USR1 or USR2")
        for name in self.export:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"slurm.export entry {name!r} is not an environment variable name: "
                                 "list names only (the values stay in your environment)")
