"""The recipe's `slurm:` section: the allocation a cluster job asks for."""
from dataclasses import dataclass, field


@dataclass
class SlurmConfig:
    """Resources for a Slurm allocation (`kiln train` also joins ranks that srun started)."""

    partition: str = field(default="", metadata={"help": "Slurm partition (empty = cluster default)"})
    nodes: int = field(default=1, metadata={"help": "nodes to allocate"})
    gpus_per_node: int = field(default=0, metadata={"help": "GPUs per node (0 = CPU ranks)"})
    time: str = field(default="01:00:00", metadata={"help": "wall-clock limit, HH:MM:SS"})
    account: str = field(default="", metadata={"help": "Slurm account to charge (empty = default)"})
