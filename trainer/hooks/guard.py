"""The loss-spike and NaN guard: a step whose loss or gradient norm is not finite is skipped, with
no optimizer update, and counted; a loss far above its recent window is counted as a spike (and
skipped too with train.spike_skip); more than train.max_skips skips in a row stop the run.

The decision is taken before the optimizer step of the last micro-step and agreed by every rank
(one all-reduce of [ranks with a non-finite loss, loss sum]), so all ranks skip the same steps.
A skip goes through the optimizer's own overflow path, the one DeepSpeed takes for an fp16
overflow: the gradients are dropped, the optimizer and the LR schedule do not step, and
`engine.skipped_steps` counts it (kiln's step, and with it the data, still moves on). DeepSpeed's
ZeRO 1-3 and bf16 optimizers also drop a step whose gradient norm they find non-finite; the guard
counts those from `engine.was_step_applied()`, and checks the gradients itself for the plain
torch optimizer (ZeRO 0 in fp32), which has no such check.

KILN_TEST_NAN_STEPS="3,5" (tests only) makes the loss of those steps (1-based, as step_N names
the checkpoint after them) NaN through a forward hook, so the real path is exercised.
"""
import contextlib
import math
import os
from collections import deque

import torch
import torch.distributed as dist

from kiln.trainer.hooks import Hook


class Diverged(Exception):
    """More than train.max_skips steps in a row were skipped: the run stops (one line, exit 2)."""


class GuardHook(Hook):
    """Skips non-finite steps, counts spikes, and stops a run that keeps skipping."""

    name = "guard"

    def __init__(self, train):
        self.cfg = train
        self.skipped, self.spikes, self.row = 0, 0, 0
        self.recent = deque(maxlen=train.spike_window)
        self.micro: list = []  # this step's micro-step losses (tensors)
        self.poison = {int(s) for s in os.environ.get("KILN_TEST_NAN_STEPS", "").split(",") if s.strip()}

    @classmethod
    def create(cls, stage):
        return cls(stage.recipe.train)

    def build(self, stage) -> None:
        if self.poison:
            stage.objective.register_forward_hook(
                lambda mod, args, out: out * float("nan") if stage.progress.step + 1 in self.poison else out)

    def step(self, stage, loss, last: bool) -> None:
        """engine.step() for one micro-step; at the last one, unless the guard skips the update."""
        engine = stage.engine
        self.micro.append(loss.detach())
        if not last:
            engine.step()
            return
        losses, self.micro = torch.stack(self.micro), []
        bad = not bool(torch.isfinite(losses).all())
        if not bad and _plain_optimizer(engine):
            bad = not _grads_finite(engine)
        agreed = torch.tensor([float(bad), float(losses.mean())], dtype=torch.float64, device=stage.run.device)
        dist.all_reduce(agreed)
        bad_ranks, mean = int(agreed[0].item()), agreed[1].item() / dist.get_world_size()
        spike = not bad_ranks and self._is_spike(mean)
        n = stage.progress.step + 1
        if bad_ranks or (spike and self.cfg.spike_skip):
            with forced_skip(engine):
                engine.step()
        else:
            engine.step()
        applied = engine.was_step_applied()
        self.spikes += int(spike)
        if applied and math.isfinite(mean):
            self.recent.append(mean)
            self.row = 0
            return
        self.skipped, self.row = self.skipped + 1, self.row + 1
        why = (f"non-finite loss on {bad_ranks} of {dist.get_world_size()} ranks" if bad_ranks else
               f"loss spike ({mean:.4g})" if spike else "non-finite gradient norm")
        if stage.run.rank0:
            print(f"kiln: step {n} skipped: {why}; no optimizer update ({self.row} in a row, "
                  f"{self.skipped} in all)", flush=True)
        if self.row > self.cfg.max_skips:
            from kiln.trainer.checkpoint import latest_tag

            tag = latest_tag(stage.run.run_dir)
            raise Diverged(f"{self.row} steps in a row skipped (the last at step {n}: {why}), more than "
                           f"train.max_skips={self.cfg.max_skips}: the run stops; "
                           + (f"its newest checkpoint, {tag}, holds the last good weights: "
                              if tag else "no checkpoint was saved yet: ")
                           + "lower optim.lr or raise optim.grad_clip / schedule.warmup_steps, then run again")

    def _is_spike(self, loss: float) -> bool:
        k, past = self.cfg.spike_sigma, self.recent
        if not k or len(past) < min(10, past.maxlen) or not math.isfinite(loss):
            return False
        mu = sum(past) / len(past)
        sd = math.sqrt(sum((x - mu) ** 2 for x in past) / (len(past) - 1))
        return loss > mu + k * sd

    def metrics(self, stage, steps: int) -> dict:
        return {"train/skipped_steps": self.skipped, "train/loss_spikes": self.spikes}

    def console(self, record: dict) -> str:
        n = record.get("train/skipped_steps", 0)
        return f" | skipped {n}" if n else ""

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "spikes": self.spikes, "row": self.row, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.spikes, self.row = (int(state.get(k, 0)) for k in ("skipped", "spikes", "row"))
        self.recent.clear()
        self.recent.extend(float(x) for x in state.get("recent", []))


def _plain_optimizer(engine) -> bool:
    """Whether DeepSpeed drives a plain torch optimizer (ZeRO 0, fp32): nothing checks its gradients."""
    return isinstance(engine.optimizer, torch.optim.Optimizer)


def _grads_finite(engine) -> bool:
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


@contextlib.contextmanager
def forced_skip(engine):
    """Make the next engine.step() take the optimizer's overflow path (DeepSpeed's fp16 overflow
    skip): gradients dropped, no optimizer or LR-schedule step, engine.skipped_steps counted."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    saved = {}

    def patch(name, fn):
        saved[name] = opt.__dict__.get(name, _MISSING)
        setattr(opt, name, fn)

    if isinstance(opt, DeepSpeedZeroOptimizer):  # ZeRO 1/2: its check finds an "overflow"
        patch("check_grad_overflow", True)
        patch("check_overflow", lambda *a, **k: setattr(opt, "overflow", True))
    elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        def overflowed(update_scale=True):
            opt.overflow = True
            return opt._loss_scale_update_and_overflow_cleanup() if update_scale else True
        patch("_overflow_check_and_loss_scale_update", overflowed)
    elif isinstance(opt, BF16_Optimizer):  # its own branch for an invalid norm
        def dropped(closure=None):
            opt.overflow, opt._global_grad_norm = True, float("inf")
            opt.clear_hp_grads()
            opt.clear_lp_grads()
        patch("step", dropped)
    else:  # a plain torch optimizer: no step; `overflow` tells the engine not to step the schedule
        patch("step", lambda closure=None: None)
        patch("overflow", True)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is _MISSING:
                delattr(opt, name)
            else:
                setattr(opt, name, old)


_MISSING = object()
