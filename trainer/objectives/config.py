"""The recipe's `objective:` section. Each objective owns its subsection here as it gains knobs."""
from dataclasses import dataclass, field


@dataclass
class ObjectiveConfig:
    """What the loss is."""

    name: str = field(default="clm", metadata={
        "help": "training objective: clm = next-token prediction", "choices": ["clm"]})
    z_loss: float = field(default=0.0, metadata={
        "help": "coefficient of the output z-loss (lse^2), 0 = off", "min": 0})
