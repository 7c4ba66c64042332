"""The trainer's own recipe sections: objective, optim, schedule, train, checkpoint, logging.

Plain ranges are field metadata (min/gt/max/lt, "zero" = what 0 means) that trainer/config.py
enforces before validate(); validate() keeps the checks that span fields.
"""
from dataclasses import dataclass, field


@dataclass
class ObjectiveConfig:
    """What the loss is."""

    name: str = field(default="clm", metadata={
        "help": "training objective: clm = next-token prediction", "choices": ["clm"]})
    z_loss: float = field(default=0.0, metadata={
        "help": "coefficient of the output z-loss (lse^2), 0 = off", "min": 0})


@dataclass
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = field(default=3e-4, metadata={"help": "peak learning rate", "gt": 0})
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "final lr as a fraction of the peak", "min": 0, "max": 1})
    weight_decay: float = field(default=0.1, metadata={
        "help": "decoupled weight decay (not on norms, biases or embeddings)", "min": 0})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "min": 0, "lt": 1})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2", "min": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon", "gt": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm, 0 = off", "min": 0})


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over train.steps."""

    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps", "min": 0})
    decay: str = field(default="cosine", metadata={
        "help": "shape after warmup", "choices": ["cosine", "linear", "constant"]})


@dataclass
class TrainConfig:
    """The run itself."""

    name: str = field(default="", metadata={"help": "run name; empty = the recipe file's stem"})
    run_root: str = field(default="runs", metadata={"help": "run directories go to <run_root>/<name>"})
    steps: int = field(default=200, metadata={"help": "optimizer steps", "min": 1})
    micro_batch: int = field(default=8, metadata={"help": "sequences per rank per micro-step", "min": 1})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step", "min": 1})
    tokens_per_step: int = field(default=0, metadata={
        "help": "data.packing=decompose: tokens per optimizer step, constant (a step of bucket 2^k has "
                "tokens_per_step / 2^k rows); 0 = micro_batch x grad_accum x data-parallel ranks x 2^max",
        "min": 0})
    nproc: int = field(default=2, metadata={"help": "local ranks started by `kiln train`", "min": 1})
    seed: int = field(default=1234, metadata={"help": "seed for init, data order and sampling"})
    log_every: int = field(default=10, metadata={"help": "console/metrics interval in steps", "min": 1})
    eval_every: int = field(default=50, metadata={
        "help": "held-out evaluation interval, 0 = only at the end", "min": 0, "zero": "0 = only at the end"})
    eval_batches: int = field(default=4, metadata={"help": "held-out batches per evaluation and rank"})
    device: str = field(default="auto", metadata={
        "help": "auto = cuda when available, else cpu", "choices": ["auto", "cpu", "cuda"]})
    precision: str = field(default="auto", metadata={
        "help": "auto = bf16 on GPU, fp32 on CPU", "choices": ["auto", "fp32", "bf16"]})
    threads: int = field(default=0, metadata={
        "help": "torch threads per rank; 0 = cores / local ranks",
        "min": 0, "zero": "0 = cores / local ranks"})
    dist_timeout_s: float = field(default=600.0, metadata={
        "help": "seconds a collective may wait for the other ranks before the run fails (rank 0 "
                "preparing data before the first step is not bounded by it)", "gt": 0})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile each transformer block (fuses norm/RoPE/SwiGLU elementwise work; "
                "the first steps compile); dense models without sequence parallelism"})
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
        "help": "with placement_refine: each layer keeps balancedness >= min(this, its ILP value)",
        "min": 0, "max": 1})
    profile_every: int = field(default=0, metadata={
        "help": "save a routing profile (counts since the last one) every this many steps, 0 = off",
        "min": 0, "zero": "0 = off"})

    def validate(self):
        """Checks across fields; each field's own range is in its metadata."""
        if self.placement == "auto" and self.placement_every < 1:
            raise ValueError("train.placement=auto needs train.placement_every >= 1 (steps between re-solves)")


@dataclass
class CheckpointConfig:
    """When and how much is saved."""

    every: int = field(default=100, metadata={
        "help": "checkpoint interval in steps, 0 = only at the end (there always is one at the end)",
        "min": 0, "zero": "0 = only at the end"})
    keep: int = field(default=2, metadata={
        "help": "newest checkpoints kept; older ones are deleted (0 = keep all)", "min": 0, "zero": "0 = keep all"})


@dataclass
class WandbConfig:
    """Weights & Biases."""

    mode: str = field(default="offline", metadata={
        "help": "offline writes locally (sync later); online needs WANDB_API_KEY",
        "choices": ["offline", "online", "disabled"]})
    project: str = field(default="kiln", metadata={"help": "W&B project"})
    entity: str = field(default="", metadata={"help": "W&B entity (empty = default)"})


@dataclass
class LoggingConfig:
    """Where metrics go."""

    wandb: WandbConfig = field(default_factory=WandbConfig, metadata={"help": "Weights & Biases"})
    metrics_file: str = field(default="metrics.jsonl", metadata={
        "help": "metrics file inside the run directory (one JSON object per line)"})
