"""Dataset decomposition's hook: what each variable-length step was made of, and tokens/s per bucket.

Every step logs its bucket, row length, rows, whether it ran sequence-parallel, its causal
attention FLOPs and its time on this rank (a record of its own, every step); each train record
adds the window's tokens/s per bucket (this rank's clock x all ranks' tokens). Each held-out
evaluation adds a record of eval/loss_b{k}, the held-out loss of every bucket of the valid split
(kiln.data.decompose_loader.DecomposeHeldOut; the loop's eval/loss is then their token-weighted
mean): the paper's loss at every length.
"""
import torch
import torch.distributed as dist

from kiln.model import attention_flops, causal_pairs
from kiln.trainer.hooks import Hook


class DecomposeHook(Hook):
    """Per-step and per-bucket metrics of a data.packing=decompose stage."""

    def __init__(self):
        self._window: dict[int, list[float]] = {}  # bucket -> [tokens, seconds]

    @classmethod
    def create(cls, stage):
        return cls() if stage.recipe.data.packing == "decompose" else None

    def step_end(self, stage, step: int, seconds: float) -> None:
        batches = stage.batches
        info = batches.step_metrics(step - 1)
        w = self._window.setdefault(info["data/bucket"], [0.0, 0.0])
        w[0] += batches.tokens_per_step
        w[1] += seconds
        pairs = causal_pairs(info["data/batch_size"], info["data/seq_len"])
        stage.run.monitor.log({"step": step, **info, "data/attn_flops": attention_flops(stage.model_cfg, pairs),
                               "data/step_s": seconds})

    def metrics(self, stage, steps: int) -> dict:
        out = {f"data/tokens_per_s_b{k}": w[0] / max(w[1], 1e-9) for k, w in sorted(self._window.items())}
        self._window = {}
        return out

    def eval_end(self, stage) -> None:
        """Log eval/loss_b{k}: each bucket's mean over its batches, averaged over ranks (collective;
        every rank evaluated the same buckets, each batch's rank losses being shares of its mean)."""
        last = getattr(stage.held_out, "last", None)
        if last is None or not last.per_tag:
            return
        ks = sorted(last.per_tag)
        t = torch.tensor([last.per_tag[k][0] / last.per_tag[k][1] for k in ks], dtype=torch.float64,
                         device=stage.run.device)
        dist.all_reduce(t)
        losses = (t / dist.get_world_size()).tolist()
        rec = {"step": stage.progress.step, "eval/buckets": len(ks), **{f"eval/loss_b{k}": v for k, v in zip(ks, losses)}}
        line = " | ".join(f"2^{k} {v:.4f}" for k, v in zip(ks, losses))
        stage.run.monitor.log(rec, f"step {stage.progress.step:>6} | eval loss per bucket: {line}")
        last.per_tag.clear()
