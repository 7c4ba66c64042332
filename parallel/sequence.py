"""Sequence parallelism applied to a model from outside it.

The model's attention modules expose a replaceable `attn_fn(q, k, v, *, causal, scale, doc_ids)`;
`apply_sequence_parallel` swaps in TokenRing, Ring or DeepSpeed-Ulysses over the sequence group.
Batches are cut by `shard_batch` into zigzag shards (the rings' causal balance) or, for Ulysses,
contiguous ones (DeepSpeed joins the shards in rank order; see parallel/ulysses.py), and `token_share` rescales each rank's mean loss so that
the average over the group is the mean over the whole sequence's tokens. `SequenceLayout` puts
the two together for a training run: the trainer hands it every batch and never asks whether
sequence parallelism is on.
"""
import torch
import torch.distributed as dist

from kiln.parallel.comm import COMM_STATS
from kiln.parallel.ring import ring_attention
from kiln.parallel.sequence_switch import SequenceSwitch
from kiln.parallel.tokenring import tokenring_attention
from kiln.parallel.ulysses import UlyssesAttention
from kiln.parallel.zigzag import zigzag_shard

IMPLS = {"tokenring": tokenring_attention, "ring": ring_attention}
LAYOUTS = {"tokenring": "zigzag", "ring": "zigzag", "ulysses": "contiguous"}  # how shard_batch cuts


def _attn_fn(group, impl: str):
    if impl == "ulysses":
        return UlyssesAttention(group)
    if impl not in IMPLS:
        raise ValueError(f"unknown sequence-parallel impl {impl!r}; use one of {sorted(LAYOUTS)}")
    ring_fn = IMPLS[impl]

    def attn_fn(q, k, v, *, causal, scale=None, doc_ids=None):
        return ring_fn(q, k, v, group=group, causal=causal, softmax_scale=scale, doc_ids=doc_ids)

    return attn_fn


def apply_sequence_parallel(model: torch.nn.Module, group, impl: str = "tokenring") -> int:
    """Route every attention module's `attn_fn` through `impl` over `group`; returns how many.

    Shard the batches with shard_batch(batch, group, LAYOUTS[impl])."""
    attn_fn = _attn_fn(group, impl)

    count = 0
    for module in model.modules():
        if hasattr(module, "attn_fn"):
            module.attn_fn = attn_fn
            count += 1
    if count == 0:
        raise ValueError("apply_sequence_parallel found no module with an `attn_fn` to replace")
    return count


def contiguous_shard(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous 1/N of x along `dim` (Ulysses' layout; a new contiguous tensor)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % world:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by the {world} "
                         f"sequence-parallel ranks; choose a multiple of {world}")
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n).contiguous()


def shard_batch(batch: dict, group, layout: str = "zigzag") -> dict:
    """This rank's shard (along the sequence, dim 1) of every [B, S] tensor of a batch, in
    `layout`: "zigzag" (TokenRing, Ring) or "contiguous" (Ulysses), see LAYOUTS.

    Position ids and document ids are sharded with the tokens, so RoPE and document masks see
    the global positions and documents that cross a shard boundary stay whole.
    """
    cut = zigzag_shard if layout == "zigzag" else contiguous_shard
    return {k: cut(v, group, dim=1) for k, v in batch.items()}


class SequenceLayout:
    """Sequence parallelism over `group` applied to `model`, and the batches laid out to match.

    Without `ring_for` every batch is cut into zigzag shards (each rank of the group loaded the
    same rows). With `ring_for(row_len) -> bool` (variable-length batches, see sequence_switch)
    only the batches it accepts are sharded and run ring attention; the others stay whole on each
    rank and run local attention. Every rank of a group sees the same row length, so they agree.
    """

    def __init__(self, model: torch.nn.Module, group, impl: str = "tokenring", ring_for=None):
        apply_sequence_parallel(model, group, impl)
        self.group, self.ring_for, self.shard_layout = group, ring_for, LAYOUTS[impl]
        self.switch = SequenceSwitch(model) if ring_for is not None else None

    def __call__(self, batch: dict) -> dict:
        """This rank's part of `batch` ([B, S] tensors) for the next forward."""
        if self.switch is not None:
            self.switch.on = bool(self.ring_for(batch["input_ids"].shape[1]))
            if not self.switch.on:
                return batch
        return shard_batch(batch, self.group, self.shard_layout)


def token_share(labels: torch.Tensor, group, ignore_index: int = -100) -> torch.Tensor:
    """Factor turning this rank's mean loss into its share of the sequence-wide mean.

    Rank r's mean over n_r valid tokens, times n_r * N / sum(n), averaged over the N ranks of
    the group, is the mean over all sum(n) tokens, exactly what one rank would compute.
    """
    n = (labels != ignore_index).sum().to(torch.float64)
    total = n.clone()
    dist.all_reduce(total, group=group)
    return n * dist.get_world_size(group) / total.clamp(min=1)  # float64; cast by the caller


def comm_metrics(steps: int) -> dict:
    """Bytes sent per step by this rank's sequence-parallel attention since the last call, per
    phase and direction (Ulysses' all-to-alls too: comm.py says how they are split)."""
    snap = COMM_STATS.snapshot()
    COMM_STATS.reset()
    out = {}
    for phase in ("fwd", "bwd"):
        for direction, nbytes in snap[phase].items():
            out[f"sp/{phase}_{direction}_bytes_per_step"] = nbytes / max(steps, 1)
    out["sp/comm_wait_s_per_step"] = snap["wait_s"] / max(steps, 1)
    return out
