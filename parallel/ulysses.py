"""DeepSpeed-Ulysses as kiln's library baseline for sequence parallelism (`parallel.sp_impl: ulysses`).

DeepSpeed's own `deepspeed.sequence.layer.DistributedAttention` does the work: an all-to-all
turns each rank's contiguous sequence shard of all heads into the whole sequence of 1/N of the
heads, kiln's local attention (kernels.attention) runs on that, and a second all-to-all turns
the output back. kiln adds only what the library leaves to its caller:
  - the layout: DeepSpeed concatenates the received shards in rank order, so the shards must be
    contiguous (sequence.contiguous_shard), not zigzag; Ulysses needs no causal balancing,
    since every rank attends over the whole sequence for its heads;
  - document ids: the local attention sees the whole sequence, so each rank's doc-id shard is
    all-gathered once per batch and the block-diagonal mask applies as on one rank;
  - byte counts in kiln.parallel.comm.COMM_STATS (DeepSpeed's all-to-alls count nothing);
  - a one-line refusal where heads or kv heads do not divide over the ranks (DeepSpeed's
    uneven-head path needs its own sequence-parallel groups, which kiln does not set up).
"""
import torch
import torch.distributed as dist

from kiln import kernels
from kiln.parallel.comm import BACKWARD, COMM_STATS, FORWARD

_BATCH_DIM, _HEAD_DIM, _SEQ_DIM = 0, 2, 1  # kiln's [B, S, H, D]


def ulysses_refusal(n_heads: int, kv_heads: int, sp: int) -> str | None:
    """Why Ulysses cannot run `n_heads`/`kv_heads` over `sp` ranks (one line), or None."""
    if n_heads % sp or kv_heads % sp:
        return (f"parallel.sp_impl=ulysses splits attention heads over the sequence ranks: "
                f"model.n_heads ({n_heads}) and its kv heads ({kv_heads}) must both be multiples of "
                f"parallel.sp ({sp}); use parallel.sp_impl=tokenring or ring, or other head counts")
    return None


def _record(phase: str, tensors, world: int, rank: int) -> None:
    """Bytes of one all-to-all of each tensor: chunk j goes to rank j, our own chunk stays."""
    for t in tensors:
        chunk = t.numel() * t.element_size() // world
        COMM_STATS.record(phase, FORWARD, chunk * (world - 1 - rank))
        COMM_STATS.record(phase, BACKWARD, chunk * rank)


class _Counted(torch.autograd.Function):
    """Identity that counts the all-to-alls its tensors take part in: in the forward the
    tensors' own exchange, in the backward their gradients' (the same sizes)."""

    @staticmethod
    def forward(ctx, world, rank, *tensors):
        ctx.world, ctx.rank = world, rank
        _record("fwd", tensors, world, rank)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        _record("bwd", [g for g in grads if g is not None], ctx.world, ctx.rank)
        return (None, None, *grads)


class UlyssesAttention:
    """An `attn_fn` (see model.Attention) running DeepSpeed's DistributedAttention over `group`."""

    def __init__(self, group):
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        if not deepspeed.comm.is_initialized():  # torch.distributed is up; wrap it, as the engine will
            deepspeed.comm.init_distributed(dist_backend=dist.get_backend(group), dist_init_required=False)
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.dist_attn = DistributedAttention(kernels.attention, group, scatter_idx=_HEAD_DIM,
                                              gather_idx=_SEQ_DIM)
        self._docs = None  # (this batch's doc-id shard, the gathered ids): one gather per batch

    def _full_docs(self, doc_ids):
        if doc_ids is None:
            return None
        if self._docs is None or self._docs[0] is not doc_ids:
            parts = [torch.empty_like(doc_ids) for _ in range(self.world)]
            dist.all_gather(parts, doc_ids.contiguous(), group=self.group)
            nbytes = doc_ids.numel() * doc_ids.element_size()
            COMM_STATS.record("fwd", FORWARD, nbytes * (self.world - 1 - self.rank))
            COMM_STATS.record("fwd", BACKWARD, nbytes * self.rank)
            self._docs = (doc_ids, torch.cat(parts, dim=_SEQ_DIM))
        return self._docs[1]

    def __call__(self, q, k, v, *, causal, scale=None, doc_ids=None):
        """This rank's output shard [B, S/N, Hq, D] for contiguous shards q [B, S/N, Hq, D],
        k/v [B, S/N, Hkv, D] and doc_ids [B, S/N]."""
        if self.world == 1:
            return kernels.attention(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)
        why = ulysses_refusal(q.shape[_HEAD_DIM], k.shape[_HEAD_DIM], self.world)
        if why:
            raise ValueError(why)
        docs = self._full_docs(doc_ids)
        q, k, v = _Counted.apply(self.world, self.rank, q, k, v)
        out = self.dist_attn(q, k, v, _BATCH_DIM, causal=causal, scale=scale, doc_ids=docs)
        (out,) = _Counted.apply(self.world, self.rank, out)
        return out
