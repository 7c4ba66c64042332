"""The recipe's `parallel:` section: how ranks are laid out and how ZeRO shards state.

Plain ranges are field metadata (min/gt/max/lt) that the recipe loader enforces before validate().
"""
from dataclasses import dataclass, field


@dataclass
class ParallelConfig:
    """Process layout. World size = data x sequence ranks; expert-parallel groups are ep
    consecutive ranks (DeepSpeed's layout), so ep divides the world size. Expert placement
    (MoETuner) and the routing profiles it is solved from are set here too."""

    zero_stage: int = field(default=0, metadata={
        "help": "DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 +gradients, 3 +parameters",
        "choices": [0, 1, 2, 3]})
    sp: int = field(default=1, metadata={
        "help": "sequence-parallel ranks per sequence (1 = off)", "min": 1})
    sp_impl: str = field(default="tokenring", metadata={
        "help": "sequence-parallel attention: tokenring (Q moves), ring (K/V move) or ulysses "
                "(DeepSpeed-Ulysses: all-to-all over heads; needs heads and kv heads divisible by sp)",
        "choices": ["tokenring", "ring", "ulysses"]})
    sp_min_len: int = field(default=0, metadata={
        "help": "data.packing=decompose with sp > 1: buckets at least this long run sequence-parallel, "
                "shorter ones data-parallel over all ranks (0 = every bucket sequence-parallel)", "min": 0})
    ep: int = field(default=1, metadata={
        "help": "expert-parallel ranks the MoE experts are sharded over (1 = off)", "min": 1})
    moe_dedup: bool = field(default=True, metadata={
        "help": "MoE dispatch sends one row per (token, destination rank) instead of one per "
                "token-choice (same outputs and gradients; fewer bytes when a token's experts share a rank)"})

    placement: str = field(default="contiguous", metadata={
        "help": "MoE expert placement: contiguous, auto (re-solve every placement_every steps) or a "
                "placement.json path (kiln place)"})
    placement_every: int = field(default=0, metadata={
        "help": "with placement=auto: re-solve the ILP and migrate experts every this many steps", "min": 0})
    placement_time_limit: float = field(default=10.0, metadata={
        "help": "seconds the ILP may take for placement=auto", "gt": 0})
    placement_refine: bool = field(default=False, metadata={
        "help": "with placement=auto: add kiln's stage 3 (cut cross-rank traffic under the balance floor)"})
    placement_async: bool = field(default=False, metadata={
        "help": "with placement=auto: rank 0 solves in a background thread while training goes on; "
                "the experts migrate at the first log_every step after it finishes"})
    placement_min_balance: float = field(default=0.95, metadata={
        "help": "with placement_refine or moe_dedup: each layer keeps balancedness >= min(this, its ILP value)",
        "min": 0, "max": 1})
    profile_every: int = field(default=0, metadata={
        "help": "save a routing profile (counts since the last one) every this many steps, 0 = off",
        "min": 0, "zero": "0 = off"})

    def validate(self):
        """Checks across fields; each field's own range is in its metadata."""
        if self.ep > 1 and self.zero_stage == 3:
            raise ValueError("parallel.ep > 1 needs parallel.zero_stage <= 2 (DeepSpeed's MoE path "
                             "does not support ZeRO-3)")
        if self.placement == "auto" and self.placement_every < 1:
            raise ValueError("parallel.placement=auto needs parallel.placement_every >= 1 (steps between re-solves)")
