"""The recipe's `parallel:` section: how ranks are laid out and how ZeRO shards state."""
from dataclasses import dataclass, field


@dataclass
class ParallelConfig:
    """Process layout. World size = data x sequence ranks (expert ranks divide the data ranks)."""

    zero_stage: int = field(default=0, metadata={
        "help": "DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 +gradients, 3 +parameters",
        "choices": [0, 1, 2, 3]})
    sp: int = field(default=1, metadata={
        "help": "sequence-parallel ranks per sequence (1 = off)"})
    sp_impl: str = field(default="tokenring", metadata={
        "help": "sequence-parallel attention: tokenring (Q moves) or ring (K/V move)",
        "choices": ["tokenring", "ring"]})

    def validate(self):
        if self.sp < 1:
            raise ValueError(f"parallel.sp must be >= 1 (got {self.sp})")
