"""The recipe's `growth:` section (model growth between training stages)."""
from dataclasses import dataclass, field


@dataclass
class GrowthConfig:
    """Model growth. Only `none` exists in this version; G_stack arrives with its own issue."""

    method: str = field(default="none", metadata={
        "help": "growth operator applied when the small-model stage ends", "choices": ["none"]})
