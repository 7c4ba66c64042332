"""Stopping at a step boundary on a signal: Slurm's warning ahead of the time limit or a
preemption (slurm.signal, USR1 by default) and SIGTERM.

A signal reaches the ranks at different moments, so the handler only notes it; at each step end
the note is all-reduced (the highest signal number wins) and every rank stops after the same
step. The loop then saves a checkpoint there and the run ends (kiln.trainer.loop, the
`should_stop` event). Every rank notes SIGTERM and SIGUSR1 (kiln.trainer.worker; inside a Slurm
job step, slurm.signal and SIGTERM: kiln.trainer.slurm_job); `kiln train` and torchrun pass
both on to the ranks (kiln.trainer.launch). SIGINT keeps today's behaviour: Ctrl-C stops at once
and keeps the newest periodic checkpoint.
"""
import json
import signal

import torch
import torch.distributed as dist

from kiln.trainer.hooks import Hook

_STATE = {"installed": False, "signum": 0}


def _note(signum, frame) -> None:
    _STATE["signum"] = max(_STATE["signum"], signum)


def install(signal_names) -> None:
    """Note `signal_names` (e.g. ["USR1", "TERM"]) instead of dying of them; call this early, so a
    signal during start-up is not fatal either."""
    for name in signal_names:
        signal.signal(getattr(signal, f"SIG{name.upper().removeprefix('SIG')}"), _note)
    _STATE["installed"] = True


def asked() -> str:
    """The name of the signal that stopped this rank ("USR1", "TERM"), "" if none."""
    return signal.Signals(_STATE["signum"]).name.removeprefix("SIG") if _STATE["signum"] else ""


class StopHook(Hook):
    """Agrees on a stop across ranks at the step boundary; records checkpoint and step times in
    RUN_DIR/slurm/timing.json, from which `kiln submit` sizes the signal's lead time."""

    def __init__(self):
        self.seen_save = None
        self.agreed = 0

    @classmethod
    def create(cls, stage):
        return cls() if _STATE["installed"] else None

    def should_stop(self, stage, step: int) -> bool:
        flag = torch.tensor([_STATE["signum"]], dtype=torch.int64, device=stage.run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.agreed = int(flag.item())
        if self.agreed:
            _STATE["signum"] = self.agreed  # asked() then names the same signal on every rank
        return bool(self.agreed)

    def step_end(self, stage, step: int, seconds: float) -> None:
        saved = getattr(stage, "last_save_s", None)
        if saved is not None and saved != self.seen_save and stage.run.rank0:
            self.seen_save = saved
            out = stage.run.run_dir / "slurm"
            out.mkdir(parents=True, exist_ok=True)
            (out / "timing.json").write_text(json.dumps({"checkpoint_s": round(saved, 3),
                                                         "step_s": round(seconds, 4)}))
