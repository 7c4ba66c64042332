"""The run's own recipe sections: `train:`, `checkpoint:` and `logging:`."""
from dataclasses import dataclass, field


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
    global_batch_tokens: int = field(default=0, metadata={
        "help": "tokens per optimizer step over all ranks (concat packing): kiln derives train.grad_accum "
                "= this / (micro_batch x data-parallel ranks x data.seq_len), so another rank count keeps "
                "the optimisation; 0 = micro_batch x grad_accum x ranks", "min": 0})
    global_batch: int = field(default=0, metadata={
        "help": "the same as train.global_batch_tokens, in sequences of data.seq_len; 0 = unset", "min": 0})
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
    compile: str = field(default="auto", metadata={
        "help": "torch.compile each transformer block (fuses norm/RoPE/SwiGLU elementwise work; "
                "the first step compiles); dense models without sequence parallelism. auto = when "
                "the steps ahead win the compile time back, by measured step times "
                "(kiln.trainer.compile_policy); true/false = on/off",
        "choices": ["auto", "on", "off"], "aliases": {True: "on", False: "off"}})
    activation_checkpointing: str = field(default="none", metadata={
        "help": "recompute activations in the backward instead of keeping them: none; full (each "
                "transformer block keeps only its input); selective (the attention core and the MLP's "
                "inner activations are recomputed, the projections kept). Same gradients; see docs/trainer.md",
        "choices": ["none", "full", "selective"]})

    max_skips: int = field(default=5, metadata={
        "help": "more skipped steps in a row than this (a non-finite loss or gradient norm, or a skipped "
                "spike) stop the run, keeping its last checkpoint (kiln.trainer.hooks.guard)", "min": 0})
    spike_sigma: float = field(default=6.0, metadata={
        "help": "a step whose loss is above the mean + this many standard deviations of the last "
                "train.spike_window steps is counted as a spike (train/loss_spikes); 0 = off",
        "min": 0, "zero": "0 = off"})
    spike_window: int = field(default=100, metadata={
        "help": "steps whose losses the spike test compares against", "min": 2})
    spike_skip: bool = field(default=False, metadata={
        "help": "also skip a spike's optimizer update (like a non-finite loss); false = only count it"})

    def validate(self):
        """train.name is one folder inside run_root: `..`, `.`, a path or an absolute name would put
        the run (and --no-resume's move aside) outside it, over other runs."""
        n = self.name
        if n and (n in (".", "..") or "/" in n or "\\" in n or n.startswith("~")):
            raise ValueError(f"train.name={n!r} must be a plain folder name inside train.run_root (no '/', "
                             "'.' or '..'): put the path in train.run_root instead")


@dataclass
class CheckpointConfig:
    """When and how much is saved."""

    every: int = field(default=100, metadata={
        "help": "checkpoint interval in steps, 0 = only at the end (there always is one at the end)",
        "min": 0, "zero": "0 = only at the end"})
    keep: int = field(default=2, metadata={
        "help": "newest checkpoints kept; older ones are deleted (0 = keep all)", "min": 0, "zero": "0 = keep all"})
    fallback: bool = field(default=False, metadata={
        "help": "resume from the previous verified checkpoint when the newest fails its manifest "
                "(a damaged or altered file), with one line saying so; false = refuse, naming the file"})
    # the issue's `checkpoint.async`: `async` is a Python keyword, so no dataclass field can have it
    async_save: bool = field(default=False, metadata={
        "help": "write DeepSpeed's files in a background thread while training goes on (same manifest "
                "and `latest` atomicity; the blocking part is a copy of the state in memory)"})


@dataclass
class WandbConfig:
    """Weights & Biases."""

    mode: str = field(default="offline", metadata={
        "help": "offline writes locally (sync later); online needs WANDB_API_KEY",
        "choices": ["offline", "online", "disabled"]})
    project: str = field(default="kiln", metadata={"help": "W&B project"})
    entity: str = field(default="", metadata={"help": "W&B entity (empty = default)"})
    group: str = field(default="", metadata={"help": "W&B group (kiln submit --sweep sets the sweep's name)"})
    tags: list[str] = field(default_factory=list, metadata={"help": "W&B tags of the run, e.g. [baseline, moe]"})


@dataclass
class LoggingConfig:
    """Where metrics go."""

    wandb: WandbConfig = field(default_factory=WandbConfig, metadata={"help": "Weights & Biases"})
    metrics_file: str = field(default="metrics.jsonl", metadata={
        "help": "metrics file inside the run directory (one JSON object per line)"})
