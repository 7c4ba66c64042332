"""The recipe's `objective:` section. Each objective owns its subsection here as it gains knobs."""
from dataclasses import dataclass, field


@dataclass
class MeapConfig:
    """MEAP: next-token prediction on inputs partly replaced by the MASK token."""

    mask_ratio: float = field(default=0.15, metadata={
        "help": "fraction of input positions replaced by MASK each step (labels unchanged)", "gt": 0, "lt": 1})
    same_positions_per_batch: bool = field(default=False, metadata={
        "help": "true = one set of positions per step for every row (the authors' code); "
                "false = fresh positions per row"})


@dataclass
class ObjectiveConfig:
    """What the loss is."""

    name: str = field(default="clm", metadata={
        "help": "training objective: clm = next-token prediction, meap = next-token prediction on "
                "inputs with objective.meap.mask_ratio of the positions masked", "choices": ["clm", "meap"]})
    z_loss: float = field(default=0.0, metadata={
        "help": "coefficient of the output z-loss (lse^2), 0 = off", "min": 0})
    meap: MeapConfig = field(default_factory=MeapConfig, metadata={"help": "MEAP's knobs (objective.name=meap)"})
