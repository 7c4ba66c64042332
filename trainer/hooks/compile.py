"""The compile policy's measurements: a stage's step times, recorded for the next run's decision.

In a compiled run the first step also compiles: its excess over the median of the later steps is
the compile time, and that median is the compiled step time. In an eager run the median of the
steps after the first (which warms allocator and engine up) is the eager step time. Rank 0 merges
them into <data.cache_dir>/compile_times.json (kiln.trainer.compile_policy) at log steps and at
the stage's last step, so that an interrupted run still leaves what it measured.
"""
import statistics

import torch.distributed as dist

from kiln.trainer.compile_policy import cache_path, inapplicable, timing_key, write_record
from kiln.trainer.hooks import Hook
from kiln.trainer.loop import due

MIN_LATER = 3  # steps after the first before a median is worth recording


def measure(times: list[float], compiled: bool) -> dict:
    """The times a run of these step durations (seconds, first step first) measured; {} if too few."""
    if len(times) < 1 + MIN_LATER:
        return {}
    later = statistics.median(times[1:])
    if not compiled:
        return {"eager_step_s": later}
    # the eager first step's own warm-up counts as compile here: it errs towards eager
    return {"compiled_step_s": later, "compile_s": max(0.0, times[0] - later)}


class CompileTimesHook(Hook):
    """Step times of a stage that torch.compile could apply to, compiled or not."""

    @classmethod
    def create(cls, stage):
        if inapplicable(stage.recipe):
            return None
        r = stage.recipe
        return cls(stage.compiled, cache_path(r.data.cache_dir), timing_key(stage), dist.get_rank() == 0,
                   r.train.log_every, stage.end)

    def __init__(self, compiled: bool, path, key: dict, writes: bool, log_every: int, end: int):
        self.compiled, self.path, self.key, self.writes = compiled, path, key, writes
        self.log_every, self.end = log_every, end
        self.times: list[float] = []

    def step_end(self, stage, step: int, seconds: float) -> None:
        self.times.append(seconds)
        if self.writes and due(self.log_every, step, self.end):
            times = measure(self.times, self.compiled)
            if times:
                write_record(self.path, self.key, times)
