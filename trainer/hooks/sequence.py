"""Sequence parallelism's hook: ring traffic per step in the train record, evaluation excluded."""
from kiln.parallel.sequence import comm_metrics
from kiln.trainer.hooks import Hook


class SequenceHook(Hook):
    """Bytes sent by ring attention per training step (kiln.parallel.comm counts them)."""

    @classmethod
    def create(cls, stage):
        return cls() if stage.run.mesh.sp > 1 else None

    def eval_end(self, stage) -> None:
        comm_metrics(1)  # evaluation traffic is not training traffic

    def metrics(self, stage, steps: int) -> dict:
        return comm_metrics(steps)
