"""The stages a recipe trains: one, or with growth a small model then the grown large one.

Both stages read the same data stream (the same data, train and parallel settings: a batch is a
pure function of (seed, step)), so the large model continues exactly where the small one
stopped, with a fresh optimizer and its own LR schedule (warmup growth.warmup_steps, decay over
the stage). Tokens and FLOPs count across stages.
"""
import dataclasses

from kiln.growth.plan import plan
from kiln.model import param_count


@dataclasses.dataclass
class StageSpec:
    """One stage: its recipe (whose model is the stage's), steps [start, end), schedule warmup."""

    index: int
    recipe: object
    start: int
    end: int
    warmup: int

    @property
    def steps(self) -> int:
        return self.end - self.start


def tokens_per_step(recipe, world: int) -> int:
    """Tokens of one optimizer step over all ranks."""
    from kiln.trainer.batches import tokens_per_step as decompose_tokens

    if recipe.data.packing == "decompose":
        return decompose_tokens(recipe, world)
    t = recipe.train
    return t.micro_batch * t.grad_accum * (world // recipe.parallel.sp) * recipe.data.seq_len


def resolved_vocab(recipe) -> int:
    """model.vocab_size, or the one kiln sizes from the BPE (data.vocab_size rounded up to 64)."""
    return recipe.model.vocab_size or -(-recipe.data.vocab_size // 64) * 64


def small_recipe(recipe):
    """The recipe of the small stage: the model growth.small_model describes (default n_layers /
    factor for stack and zero, dense for upcycle), everything else the run's, growth off."""
    from kiln.trainer.config import ConfigError, from_dict, merge, to_dict

    g, m = recipe.growth, recipe.model
    default = {"mlp": "swiglu"} if g.op == "upcycle" else {"n_layers": m.n_layers // g.factor}
    if g.op != "upcycle" and "n_layers" not in g.small_model and m.n_layers % g.factor:
        raise ConfigError(f"model.n_layers={m.n_layers} is not a multiple of growth.factor={g.factor}: "
                          "set growth.small_model.n_layers, or a factor that divides it")
    values = to_dict(recipe)
    values["model"] = merge(values["model"], merge(default, g.small_model))
    values["growth"] = {"op": "none"}
    if values["model"]["mlp"] != "moe":
        values["parallel"] = {**values["parallel"], "ep": 1, "placement": "contiguous"}
    try:
        return from_dict(values, saved=True)
    except ConfigError as e:
        raise ConfigError(f"the small model (growth.small_model): {e}") from None


def growth_step(recipe, world: int) -> int:
    """The optimizer step at which the small stage ends (ConfigError if it is not inside the run)."""
    from kiln.trainer.config import ConfigError

    g, steps = recipe.growth, recipe.train.steps
    step_tokens = tokens_per_step(recipe, world)
    budget = steps * step_tokens
    if g.at_tokens == "auto":
        target = param_count(dataclasses.replace(recipe.model, vocab_size=resolved_vocab(recipe)))
        p = plan(target, budget)
        if p.warnings:
            raise ConfigError(f"growth.at_tokens=auto: {p.warnings[-1]}; set growth.at_tokens to a token "
                              f"count or a fraction of the {budget:,}-token budget (kiln grow plan prints d)")
        tokens = p.tokens
    elif isinstance(g.at_tokens, float):
        tokens = g.at_tokens * budget
    else:
        tokens = g.at_tokens
    step = round(tokens / step_tokens)
    if not 1 <= step < steps:
        raise ConfigError(f"growth.at_tokens={g.at_tokens!r} puts growth at step {step}, outside the run "
                          f"(train.steps={steps}, {step_tokens:,} tokens a step): grow between step 1 and "
                          f"{steps - 1}")
    return step


def stage_specs(recipe, world: int) -> list[StageSpec]:
    """The run's stages in order (see the module docstring)."""
    steps, warmup = recipe.train.steps, recipe.schedule.warmup_steps
    g = recipe.growth
    if g.op == "none":
        return [StageSpec(0, recipe, 0, steps, warmup)]
    if g.op == "upcycle" and recipe.parallel.ep > 1:
        from kiln.trainer.config import ConfigError

        raise ConfigError("growth.op=upcycle with parallel.ep > 1 is not supported yet (the dense stage "
                          "has no experts to shard): use parallel.ep=1")
    small = small_recipe(recipe)
    at = growth_step(recipe, world)
    large_warmup = warmup if g.warmup_steps < 0 else g.warmup_steps
    return [StageSpec(0, small, 0, at, warmup), StageSpec(1, recipe, at, steps, large_warmup)]
