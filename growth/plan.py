"""When to grow: the G_stack authors' fitted formula for the small model's token budget.

    log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74,   C = 6 N D

N = the target (grown) model's parameters, D = its token budget, d = tokens to train the small
model before growing. The authors fitted it on target models of 410M to 7B parameters with
budgets up to a few hundred billion tokens (their check values: N = 7B, D = 2T gives d ~ 11.1B;
Llama3-8B with D = 15T gives d ~ 6.6B). Outside that range it extrapolates, and for tiny models
it can even exceed D: `plan` says so instead of pretending.
"""
import math
from dataclasses import dataclass

FITTED_PARAMS = (4.1e8, 7e9)  # target sizes the formula was fitted on (410M .. 7B)


def growth_tokens(target_params: float, target_tokens: float) -> float:
    """d, the tokens to train the small model for (the fitted formula above)."""
    if target_params <= 0 or target_tokens <= 0:
        raise ValueError("target parameters and tokens must be > 0")
    c = 6 * target_params * target_tokens
    return 10 ** (0.88 * math.log10(target_params) + 163.27 / math.log10(c) - 5.74)


@dataclass
class Plan:
    """A growth plan: d, its share of the budget, and what makes it doubtful (empty: none)."""

    target_params: float
    target_tokens: float
    tokens: float
    warnings: list

    @property
    def share(self) -> float:
        return self.tokens / self.target_tokens


def plan(target_params: float, target_tokens: float) -> Plan:
    """d for a target model and budget, with a warning for every way it leaves the fitted range."""
    d = growth_tokens(target_params, target_tokens)
    warnings = []
    lo, hi = FITTED_PARAMS
    if not lo <= target_params <= hi:
        warnings.append(f"the formula was fitted on targets of {lo / 1e9:.2g}B-{hi / 1e9:.0f}B parameters; "
                        f"{target_params / 1e9:.3g}B is outside, so d is an extrapolation")
    if d >= target_tokens:
        warnings.append(f"d = {d:.3g} tokens is not below the budget D = {target_tokens:.3g}: the small model "
                        "would never grow")
    return Plan(target_params, target_tokens, d, warnings)
