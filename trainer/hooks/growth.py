"""Growth's hook: which stage each record belongs to, and the transition itself as an event."""
from kiln.trainer.hooks import Hook


class GrowthHook(Hook):
    """growth/stage in every train record; growth/event when a grown stage starts."""

    @classmethod
    def create(cls, stage):
        return cls() if stage.run.recipe.growth.op != "none" else None

    def after_resume(self, stage, step: int) -> None:
        grown = stage.grown
        if grown is None:
            return
        small, large = grown.params
        op = stage.run.recipe.growth.op
        stage.run.monitor.log({"step": step, "growth/event": f"grow:{op}", "growth/stage": stage.index,
                                 "growth/params_small": small, "growth/params_large": large},
                                f"kiln: growth ({op}) at step {step}: {small / 1e6:.2f}M -> {large / 1e6:.2f}M "
                                f"params from {grown.tag}; fresh optimizer, new schedule "
                                f"(warmup {stage.spec.warmup} steps)")

    def metrics(self, stage, steps: int) -> dict:
        return {"growth/stage": stage.index}
