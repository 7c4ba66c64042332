"""Ring Attention baseline: Q stays, K and V (and their doc ids) travel round the ring.

Step s on rank r of N: hold K/V of rank r+s, send the part rank r-1 needs next to r-1 while
receiving the next from r+1, compute own Q x held K/V, merge into the running output.
Zigzag balanced like TokenRing (same block plan, same direction trick: a K/V shard meets the
ranks that need all of it first, so after the wrap only its first half moves).
Backward: K/V travel again; dQ accumulates locally; the dK/dV of a shard ride round the ring
in a full-size accumulator, one step behind K/V, each rank adding its block, until the last
holder hands it to the owner (the usual ring-flash-attention design; one direction only).
"""
import torch

from kiln.kernels import attention_bwd, attention_fwd  # the dispatch point: Triton on CUDA
from kiln.kernels.block_attention import attention, compute_dtype
from kiln.parallel.comm import BACKWARD
from kiln.parallel.ring_common import (Exchange, block_plan, check_inputs, empty_accumulators,
                                       kv_rows, local_blocks, merge_partial, ring_group)

_TAG_KV, _TAG_ACC = 0, 16

__all__ = ["ring_attention"]


def _pass_kv(ex, rg, held, s, causal, s_local):
    """Queue step s's K/V hand-over; returns the buffers of what arrives for step s+1."""
    r, src = rg.rank, rg.next(s)
    h_lo = kv_rows(r, src, s_local, causal)[0]
    lo, hi = kv_rows(rg.next(-1), src, s_local, causal)
    dims = [1] * len(held)
    ex.send_rows(held, dims, lo - h_lo, hi - h_lo, rg.next(-1), BACKWARD, _TAG_KV)
    nlo, nhi = kv_rows(r, rg.next(s + 1), s_local, causal)
    return ex.recv_rows(held, dims, nhi - nlo, rg.next(1), _TAG_KV)


def _held_block(rg, src, s_local, causal):
    """Step src's block with K/V rows relative to the held part of K/V's shard, and that
    part's first row in the shard (the offset of its gradient in the owner's dK/dV)."""
    ql, qh, kl, kh, diag = block_plan(rg.rank, src, s_local, causal)
    return (ql, qh, 0, kh - kl, diag), kl


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, rg, causal, scale):
        s_local = q.shape[1]
        out, lse = empty_accumulators(q)
        held = [k, v] + ([doc] if doc is not None else [])
        for s in range(rg.world):
            src = rg.next(s)
            ex = Exchange(rg, "fwd")
            nxt = _pass_kv(ex, rg, held, s, causal, s_local) if s + 1 < rg.world else None
            ex.start()
            (ql, qh, kl, kh, diag), _ = _held_block(rg, src, s_local, causal)
            o, l_ = attention_fwd(q[:, ql:qh], held[0][:, kl:kh], held[1][:, kl:kh], causal=diag,
                                  scale=scale, q_doc=doc[:, ql:qh] if doc is not None else None,
                                  k_doc=held[2][:, kl:kh] if doc is not None else None)
            merge_partial(out, lse, ql, qh, o, l_)
            ex.wait()
            held = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc)
        ctx.rg, ctx.causal, ctx.scale = rg, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc = ctx.saved_tensors
        rg, causal, scale = ctx.rg, ctx.causal, ctx.scale
        n, s_local, cd = rg.world, q.shape[1], compute_dtype(q.dtype)
        delta = (dout.to(cd) * out.to(cd)).sum(-1).transpose(1, 2)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros_like(dk)

        def block_grads(kv, block, dk_into, dv_into):
            """dQ into dq; this block's dK/dV into the given [B, S_local, ...] buffers."""
            ql, qh, kl, kh, diag = block
            dq_b, dk_b, dv_b = attention_bwd(
                dout[:, ql:qh], q[:, ql:qh], kv[0][:, kl:kh], kv[1][:, kl:kh], None,
                lse[:, :, ql:qh], causal=diag, scale=scale, delta=delta[:, :, ql:qh],
                q_doc=doc[:, ql:qh] if doc is not None else None,
                k_doc=kv[2][:, kl:kh] if doc is not None else None)
            dq[:, ql:qh] += dq_b
            dk_into[:, kl:kh] += dk_b
            dv_into[:, kl:kh] += dv_b

        first, last = local_blocks(s_local, causal)
        own = [k, v] + ([doc] if doc is not None else [])
        held, pending = own, None
        for s in range(n + 1):
            src = rg.next(s)
            ex = Exchange(rg, "bwd")
            nxt = _pass_kv(ex, rg, held, s, causal, s_local) if s + 1 < n else None
            acc = None
            if s >= 2:  # the accumulator of step s-1 moves on; ours-to-extend (or own) arrives
                ex.send(pending[0], rg.next(-1), BACKWARD, _TAG_ACC)
                ex.send(pending[1], rg.next(-1), BACKWARD, _TAG_ACC + 1)
                acc = [ex.recv(dk.shape, cd, dk.device, rg.next(1), _TAG_ACC + i) for i in (0, 1)]
            ex.start()
            if s == 0 or s == n:  # own blocks, split to hide the first and the last transfer
                for block in first if s == 0 else last:
                    block_grads(own, block, dk, dv)
                part = None
            else:  # this block's dK/dV, placed at the held part's offset in the shard
                block, off = _held_block(rg, src, s_local, causal)
                part = [torch.zeros_like(dk), torch.zeros_like(dv)]
                block_grads(held, block, part[0][:, off:], part[1][:, off:])
            ex.wait()
            if part is not None:  # extend the travelling accumulator of the K/V held now
                pending = part if acc is None else [acc[0].add_(part[0]), acc[1].add_(part[1])]
            elif s == n:  # our own shard's accumulator came home
                dk += acc[0]
                dv += acc[1]
            held = nxt
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q, k, v, *, group=None, causal: bool = True, softmax_scale=None,
                   doc_ids=None):
    """Sequence-parallel attention over `group` with Ring Attention (K/V move, Q stays).

    Same contract as tokenring_attention: zigzag shards in, this rank's output shard out,
    differentiable in q, k, v; a group of one rank is plain local attention.
    """
    rg = ring_group(group)
    check_inputs(q, k, v, doc_ids, causal, rg)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if rg.world == 1:
        return attention(q, k, v, causal=causal, scale=scale, q_doc=doc_ids, k_doc=doc_ids)
    return _Ring.apply(q, k, v, doc_ids, rg, causal, scale)
