"""The recipe's `growth:` section: train a small model first, grow it, continue with the large one."""
import typing
from dataclasses import dataclass, field


@dataclass
class GrowthConfig:
    """Model growth between two training stages (G_stack and the operators compared with it)."""

    op: str = field(default="none", metadata={
        "help": "growth operator: none (one stage), stack (G_stack: layer i = small layer i mod L), zero "
                "(stack with the new layers' output projections at zero: the same function), upcycle "
                "(dense MLPs become MoE experts, copies of the MLP)",
        "choices": ["none", "stack", "zero", "upcycle"]})
    factor: int = field(default=4, metadata={
        "help": "stack/zero: the large model has factor x the small model's layers (the paper's g = 4)"})
    at_tokens: typing.Any = field(default="auto", metadata={
        "help": "when to grow: auto (the paper's fitted formula for the large model and the run's token "
                "budget), a token count, or a fraction (0, 1) of the budget"})
    small_model: dict = field(default_factory=dict, metadata={
        "help": "model: keys of the small model that differ from the large one; default n_layers = "
                "model.n_layers / factor (stack, zero) or mlp = swiglu (upcycle)"})
    warmup_steps: int = field(default=-1, metadata={
        "help": "linear warmup of the large stage's fresh schedule; -1 = schedule.warmup_steps", "min": -1})
    upcycle_noise: float = field(default=0.0, metadata={
        "help": "upcycle: std of the Gaussian noise added to each expert copy, relative to the MLP "
                "weight's std (0 = exact copies: the MoE computes the dense function)", "min": 0})

    def validate(self):
        """Checks across fields; each field's own range is in its metadata."""
        if self.op in ("stack", "zero") and self.factor < 2:
            raise ValueError(f"growth.factor must be >= 2 to grow (got {self.factor}): the paper's g = 4")
        a = self.at_tokens
        ok = a == "auto" or (isinstance(a, int) and not isinstance(a, bool) and a >= 1) or \
            (isinstance(a, float) and 0 < a < 1)
        if not ok:
            raise ValueError(f"growth.at_tokens must be auto, a token count >= 1 or a fraction in (0, 1) "
                             f"of the budget (got {a!r})")
