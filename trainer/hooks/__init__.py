"""The hook protocol: everything a stage does beyond the plain step, behind fixed events.

The loop (kiln.trainer.loop) knows no method by name; it calls `Hooks` at these events, and each
hook implements the ones it needs (the base class makes every event a no-op):

| event | when | collective |
| --- | --- | --- |
| `build(stage)` | the stage's model, objective and engine exist | yes |
| `after_resume(stage, step)` | the checkpoint is restored (or a fresh start), before step `step` | yes |
| `step_end(stage, step, seconds)` | optimizer step `step` (counted from 1) is done | yes |
| `eval_begin(stage)` / `eval_end(stage)` | around a held-out evaluation | yes |
| `metrics(stage, steps) -> dict` | a log step: fields added to the train record (window of `steps`) | yes |
| `should_stop(stage, step) -> bool` | after step `step`'s log, eval and checkpoint: True ends the stage there (the loop saves a checkpoint first); only StopHook (signals) | yes |
| `console(record) -> str` | a log step: text appended to the console line (rank 0) | no |
| `step(stage, loss, last)` | GuardHook only, through Stage.step: takes the micro-step's engine.step() (and may skip the update) | yes |
| `parts() -> dict` | checkpoint parts the hook owns: its `state_dict()` / files (kiln.trainer.checkpoint) | no |

Hooks of a stage come from HOOKS, in order; each factory returns None when its feature is off.
"""


class Hook:
    """A stage plug-in; override the events you need (see the module docstring)."""

    name = ""  # the key of this hook's state in a checkpoint ("" = it keeps none)

    def build(self, stage) -> None:
        pass

    def after_resume(self, stage, step: int) -> None:
        pass

    def step_end(self, stage, step: int, seconds: float) -> None:
        pass

    def eval_begin(self, stage) -> None:
        pass

    def eval_end(self, stage) -> None:
        pass

    def metrics(self, stage, steps: int) -> dict:
        return {}

    def should_stop(self, stage, step: int) -> bool:
        return False

    def console(self, record: dict) -> str:
        return ""

    def parts(self) -> dict:
        """Checkpoint parts: by default this hook itself under its name, when it has one."""
        return {self.name: self} if self.name else {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Hooks:
    """Calls every hook of a stage, in order, at each event."""

    def __init__(self, hooks):
        self.hooks = list(hooks)

    def __iter__(self):
        return iter(self.hooks)

    def build(self, stage) -> None:
        for h in self.hooks:
            h.build(stage)

    def after_resume(self, stage, step: int) -> None:
        for h in self.hooks:
            h.after_resume(stage, step)

    def step_end(self, stage, step: int, seconds: float) -> None:
        for h in self.hooks:
            h.step_end(stage, step, seconds)

    def eval_begin(self, stage) -> None:
        for h in self.hooks:
            h.eval_begin(stage)

    def eval_end(self, stage) -> None:
        for h in self.hooks:
            h.eval_end(stage)

    def metrics(self, stage, steps: int) -> dict:
        out = {}
        for h in self.hooks:
            out.update(h.metrics(stage, steps))
        return out

    def should_stop(self, stage, step: int) -> bool:
        # every hook is asked (each may be collective): no short-circuit
        return any([h.should_stop(stage, step) for h in self.hooks])

    def console(self, record: dict) -> str:
        return "".join(h.console(record) for h in self.hooks)

    def parts(self) -> dict:
        out = {}
        for h in self.hooks:
            out.update(h.parts())
        return out


def stage_hooks(stage) -> Hooks:
    """The hooks of `stage`: every factory of HOOKS whose feature the stage uses."""
    from kiln.trainer.hooks.compile import CompileTimesHook
    from kiln.trainer.hooks.decompose import DecomposeHook
    from kiln.trainer.hooks.growth import GrowthHook
    from kiln.trainer.hooks.guard import GuardHook
    from kiln.trainer.hooks.moe import MoEHook
    from kiln.trainer.hooks.sequence import SequenceHook
    from kiln.trainer.hooks.stop import StopHook

    factories = (SequenceHook.create, MoEHook.create, DecomposeHook.create, CompileTimesHook.create,
                 GrowthHook.create, StopHook.create, GuardHook.create)
    return Hooks(h for h in (make(stage) for make in factories) if h is not None)
