"""The optimizer's recipe sections (`optim:`, `schedule:`), the LR schedule and AdamW's parameter groups."""
import math
from dataclasses import dataclass, field



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
        "help": "shape after warmup: cosine, linear or constant over the rest; wsd = warmup-stable-decay "
                "(constant, then a linear decay over the last decay_fraction of the steps after warmup)",
        "choices": ["cosine", "linear", "constant", "wsd"]})
    decay_fraction: float = field(default=0.2, metadata={
        "help": "decay=wsd: the share of the post-warmup steps spent decaying", "min": 0, "max": 1})


def lr_lambda(step: int, warmup: int, total: int, decay: str, min_ratio: float,
              decay_fraction: float = 0.2) -> float:
    """LR multiplier at `step` (0-based): linear warmup, then cosine/linear decay to min_ratio
    (wsd: constant, then linear over the last decay_fraction of the post-warmup steps)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    if decay == "wsd":
        span = max(1, round(decay_fraction * (total - warmup)))
        t = min(1.0, max(0.0, (step - (total - span)) / span)) if decay_fraction else 0.0
        return min_ratio + (1 - min_ratio) * (1 - t)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
    return min_ratio + (1 - min_ratio) * shape


def param_groups(model, weight_decay: float):
    """Matrices decay; norms, biases and embeddings don't."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (keep if p.dim() < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def schedule_change(old: dict, recipe, step: int) -> str | None:
    """A warning when resuming at `step` with another train.steps moves the LR schedule under the
    run (the decay spans train.steps, so raising it on a finished cosine run lifts the LR back
    up with no other sign); None when the LR at `step` stays the same."""
    o_steps = old.get("train", {}).get("steps")
    s = recipe.schedule
    if o_steps is None or o_steps == recipe.train.steps:
        return None
    o_sched = old.get("schedule", {})
    before = lr_lambda(step, o_sched.get("warmup_steps", s.warmup_steps), o_steps, o_sched.get("decay", s.decay),
                       old.get("optim", {}).get("min_lr_ratio", recipe.optim.min_lr_ratio),
                       o_sched.get("decay_fraction", s.decay_fraction))
    after = lr_lambda(step, s.warmup_steps, recipe.train.steps, s.decay, recipe.optim.min_lr_ratio, s.decay_fraction)
    if abs(after - before) <= 1e-9:
        return None
    return (f"kiln: warning: train.steps {o_steps} -> {recipe.train.steps} moves the {s.decay} schedule under the "
            f"run: the LR at step {step} goes from {before:.3g}x to {after:.3g}x optim.lr ({after / max(before, 1e-12):.2g}x). "
            "Keep the old train.steps to keep its LR; runs that may grow are better planned with "
            "schedule.decay=wsd (flat until the last decay_fraction, so more steps move only the tail)")
