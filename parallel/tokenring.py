"""TokenRing: sequence-parallel attention in which Q travels and K/V stay (METHODS.md §2).

Forward, step s on rank r of N (zigzag layout, see ring_common.block_plan):
  - Q of rank r+s is held; the part of it that rank r-1 needs next is sent to r-1 ("backward")
    while the next Q arrives from r+1;
  - the partial (out, lse) computed at step s-1 goes straight back to its owner r+s-1
    ("forward", the other direction), and our own partial from rank r-s+1 arrives;
  - meanwhile the block Q x local K/V is computed; then the received partial is merged.
Travelling towards lower ranks makes each shard meet the ranks that need all of it before
the ones that need only its second half, so after the wrap only half of Q moves.
Backward: Q, dO, lse and delta = rowsum(dO * O) travel the same way, every rank adds its
block's dK/dV into its own accumulators (no dK/dV ever moves) and the partial dQ returns to
Q's owner the other way.
"""
import torch

from kiln.kernels import attention_bwd, attention_fwd  # the dispatch point: Triton on CUDA
from kiln.kernels.block_attention import attention, compute_dtype
from kiln.parallel.comm import BACKWARD, FORWARD
from kiln.parallel.ring_common import (Exchange, block_plan, check_inputs, empty_accumulators,
                                       local_blocks, merge_partial, q_rows, ring_group,
                                       schedule_flops)

_TAG_TRAVEL, _TAG_RETURN = 0, 16  # message kinds: travelling bundle / partial going home

__all__ = ["tokenring_attention", "schedule_flops"]


def _ring_loop(rg, travel, dims, causal, phase, part_dims, compute, fold):
    """The TokenRing schedule shared by forward and backward.

    travel: this rank's travelling tensors (Q first) with their sequence dims `dims`.
    compute(held, off, block) -> partial for `block` = (q_lo, q_hi, kv_lo, kv_hi, causal),
    where the held travelling tensors start at Q row `off`. fold(lo, hi, partial) adds a
    partial of our own Q rows [lo, hi) into the result. Our own blocks (local_blocks) run at
    step 0 and after the last step, hiding the first hand-over and the last return.
    """
    n, r, s_local = rg.world, rg.rank, travel[0].shape[1]
    first, last = local_blocks(s_local, causal)
    held, pending = travel, None  # pending: (owner, partial) computed at the previous step
    for s in range(n + 1):
        src = rg.next(s)
        ex = Exchange(rg, phase)
        nxt = mine = None
        if s + 1 < n:  # pass on what r-1 needs of the Q we hold; get what we need next
            h_lo = q_rows(src, r, s_local, causal)[0]
            lo, hi = q_rows(src, rg.next(-1), s_local, causal)
            ex.send_rows(held, dims, lo - h_lo, hi - h_lo, rg.next(-1), BACKWARD, _TAG_TRAVEL)
            nlo, nhi = q_rows(rg.next(s + 1), r, s_local, causal)
            nxt = ex.recv_rows(held, dims, nhi - nlo, rg.next(1), _TAG_TRAVEL)
        if s >= 2:  # partials of step s-1 go home; ours comes from rank r-(s-1)
            owner, part = pending
            for i, t in enumerate(part):
                ex.send(t, owner, FORWARD, _TAG_RETURN + i)
            peer = rg.next(-(s - 1))
            lo, hi = q_rows(r, peer, s_local, causal)
            like = [t.narrow(d, 0, 1) for t, d in zip(part, part_dims)]
            mine = (lo, hi, ex.recv_rows(like, part_dims, hi - lo, peer, _TAG_RETURN))
        ex.start()
        if s == 0 or s == n:
            for block in first if s == 0 else last:
                fold(block[0], block[1], compute(travel, 0, block))
        else:
            block = block_plan(src, r, s_local, causal)
            pending = (src, compute(held, block[0], block))
        ex.wait()
        if mine is not None:
            fold(*mine)
        held = nxt


class _TokenRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, rg, causal, scale):
        out, lse = empty_accumulators(q)
        travel = [q] + ([doc] if doc is not None else [])

        def compute(held, off, block):
            ql, qh, kl, kh, diag = block
            rows = slice(ql - off, qh - off)
            o, l_ = attention_fwd(held[0][:, rows], k[:, kl:kh], v[:, kl:kh], causal=diag,
                                  scale=scale, q_doc=held[1][:, rows] if doc is not None else None,
                                  k_doc=doc[:, kl:kh] if doc is not None else None)
            return [o, l_]

        def fold(lo, hi, part):
            merge_partial(out, lse, lo, hi, part[0], part[1])

        _ring_loop(rg, travel, [1] * len(travel), causal, "fwd", [1, 2], compute, fold)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc)
        ctx.rg, ctx.causal, ctx.scale = rg, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc = ctx.saved_tensors
        rg, causal, scale = ctx.rg, ctx.causal, ctx.scale
        cd = compute_dtype(q.dtype)
        dout = dout.contiguous()
        delta = (dout.to(cd) * out.to(cd)).sum(-1).transpose(1, 2).contiguous()
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros_like(dk)
        travel = [q, dout, lse, delta] + ([doc] if doc is not None else [])
        dims = [1, 1, 2, 2] + ([1] if doc is not None else [])

        def compute(held, off, block):
            ql, qh, kl, kh, diag = block
            rows = slice(ql - off, qh - off)
            dq_b, dk_b, dv_b = attention_bwd(
                held[1][:, rows], held[0][:, rows], k[:, kl:kh], v[:, kl:kh], None,
                held[2][:, :, rows], causal=diag, scale=scale, delta=held[3][:, :, rows],
                q_doc=held[4][:, rows] if doc is not None else None,
                k_doc=doc[:, kl:kh] if doc is not None else None)
            dk[:, kl:kh] += dk_b  # K/V gradients stay where K/V live
            dv[:, kl:kh] += dv_b
            return [dq_b]

        def fold(lo, hi, part):
            dq[:, lo:hi] += part[0]

        _ring_loop(rg, travel, dims, causal, "bwd", [1], compute, fold)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def tokenring_attention(q, k, v, *, group=None, causal: bool = True, softmax_scale=None,
                        doc_ids=None):
    """Sequence-parallel attention over `group` with TokenRing (Q moves, K/V stay).

    q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D] and doc_ids [B, S_local] (optional: also
    mask to equal document ids, documents may cross shards) are this rank's zigzag shards
    (zigzag_shard). Returns this rank's shard of the output [B, S_local, Hq, D]; differentiable
    in q, k, v. A group of one rank (or no torch.distributed) is plain local attention.
    """
    rg = ring_group(group)
    check_inputs(q, k, v, doc_ids, causal, rg)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if rg.world == 1:
        return attention(q, k, v, causal=causal, scale=scale, q_doc=doc_ids, k_doc=doc_ids)
    return _TokenRing.apply(q, k, v, doc_ids, rg, causal, scale)
