"""The recipe's `parallel:` section: how ranks are laid out and how ZeRO shards state.

Plain ranges are field metadata (min/gt/max/lt) that the recipe loader enforces before validate().
"""
from dataclasses import dataclass, field


@dataclass
class ParallelConfig:
    """Process layout. World size = data x sequence ranks; expert-parallel groups are ep
    consecutive ranks (DeepSpeed's layout), so ep divides the world size."""

    zero_stage: int = field(default=0, metadata={
        "help": "DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 +gradients, 3 +parameters",
        "choices": [0, 1, 2, 3]})
    sp: int = field(default=1, metadata={
        "help": "sequence-parallel ranks per sequence (1 = off)", "min": 1})
    sp_impl: str = field(default="tokenring", metadata={
        "help": "sequence-parallel attention: tokenring (Q moves) or ring (K/V move)",
        "choices": ["tokenring", "ring"]})
    sp_min_len: int = field(default=0, metadata={
        "help": "data.packing=decompose with sp > 1: buckets at least this long run sequence-parallel, "
                "shorter ones data-parallel over all ranks (0 = every bucket sequence-parallel)", "min": 0})
    ep: int = field(default=1, metadata={
        "help": "expert-parallel ranks the MoE experts are sharded over (1 = off)", "min": 1})

    def validate(self):
        """Checks across fields; each field's own range is in its metadata."""
        if self.ep > 1 and self.zero_stage == 3:
            raise ValueError("parallel.ep > 1 needs parallel.zero_stage <= 2 (DeepSpeed's MoE path "
                             "does not support ZeRO-3)")
