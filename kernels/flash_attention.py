"""Flash attention in Triton: tiled forward returning the log-sum-exp, and its backward.

Same contract as kernels/block_attention.py (the torch path): q [B, Sq, Hq, D], k/v
[B, Sk, Hkv, D] with Hq % Hkv == 0 (GQA), causal top-left aligned (query i sees keys j <= i),
optional document ids q_doc [B, Sq] / k_doc [B, Sk]; a row that sees no key gets lse = -inf
and out = 0. The backward accepts a *global* lse / delta so ring attention can call it per block.

Kernels: forward (online softmax over key tiles, exp2 domain), dK/dV (one program per key tile
and kv head, looping over the query heads that share it, so GQA needs no atomics), dQ (one
program per query tile and head). delta = rowsum(dO * O) is a torch reduction.

Block-sparse document masks: with document ids, every kernel also gets each tile's [min, max]
document id (QT [B, n_qt, 2] for query tiles, KT [B, n_kt, 2] for key tiles, `tile_ranges`) and
skips a (query tile, key tile) pair whose ranges do not overlap: no query there shares a document
with any key, so the tile's scores are all masked and it adds exactly nothing (p = 0, alpha = 1).
The test is conservative for any ids (disjoint ranges mean no equal ids); for packed documents,
whose ids grow along the sequence, it skips every fully cross-document tile. `tile_counts`
counts, on the host with the kernels' own rule, the tiles visited and skipped.
"""
import math

import torch
import triton
import triton.language as tl

from kiln.kernels.block_attention import BlockAttention, _check
from kiln.kernels.triton_util import check_device, contiguous_last, dot_precision, next_pow2

_LOG2E = 1.4426950408889634


@triton.jit
def _fwd(Q, K, V, O, LSE, QD, KD, QT, KT, qk_scale, Sq, Sk, Hq, n_rep, D, n_qt, n_kt,
         sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, sdqb, sdkb,
         CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)  # int64 offsets: B * S * H * D may pass 2**31
    h = bh % Hq
    hk = h // n_rep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < D
    q = tl.load(Q + b * sqb + offs_m[:, None] * sqs + h * sqh + offs_d[None, :],
                mask=(offs_m[:, None] < Sq) & dm[None, :], other=0.0)
    if HAS_DOC:
        qd = tl.load(QD + b * sdqb + offs_m, mask=offs_m < Sq, other=-1)
        q_lo = tl.load(QT + (b * n_qt + pid_m) * 2)
        q_hi = tl.load(QT + (b * n_qt + pid_m) * 2 + 1)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = Sk
    if CAUSAL:
        end = tl.minimum(Sk, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        visit = True
        if HAS_DOC:  # block-sparse document mask: skip a tile that shares no document
            k_lo = tl.load(KT + (b * n_kt + n0 // BLOCK_N) * 2)
            k_hi = tl.load(KT + (b * n_kt + n0 // BLOCK_N) * 2 + 1)
            visit = (k_hi >= q_lo) & (k_lo <= q_hi)
        if visit:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n[:, None] < Sk) & dm[None, :]
            k = tl.load(K + b * skb + offs_n[:, None] * sks + hk * skh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            ok = offs_n[None, :] < Sk
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            if HAS_DOC:
                kd = tl.load(KD + b * sdkb + offs_n, mask=offs_n < Sk, other=-2)
                ok = ok & (qd[:, None] == kd[None, :])
            s = tl.where(ok, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # rows that have seen no key yet keep m = -inf; subtract 0 there so exp2 gives 0, not nan
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + b * svb + offs_n[:, None] * svs + hk * svh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, -float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    rm = offs_m < Sq
    tl.store(O + b * sob + offs_m[:, None] * sos + h * soh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=rm[:, None] & dm[None, :])
    tl.store(LSE + bh * Sq + offs_m, lse, mask=rm)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, QD, KD, QT, KT, DK, DV, qk_scale, scale, Sq, Sk, Hq, Hkv, n_rep, D,
              n_qt, n_kt,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdkb,
              CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = bhk % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < D
    nm = offs_n < Sk
    k = tl.load(K + b * skb + offs_n[:, None] * sks + hk * skh + offs_d[None, :],
                mask=nm[:, None] & dm[None, :], other=0.0)
    v = tl.load(V + b * svb + offs_n[:, None] * svs + hk * svh + offs_d[None, :],
                mask=nm[:, None] & dm[None, :], other=0.0)
    if HAS_DOC:
        kd = tl.load(KD + b * sdkb + offs_n, mask=nm, other=-2)
        k_lo = tl.load(KT + (b * n_kt + pid_n) * 2)
        k_hi = tl.load(KT + (b * n_kt + pid_n) * 2 + 1)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start = 0
    if CAUSAL:
        start = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # earlier query tiles see none of these keys
    for g in range(0, n_rep):
        h = hk * n_rep + g
        for m0 in range(start, Sq, BLOCK_M):
            visit = True
            if HAS_DOC:
                q_lo = tl.load(QT + (b * n_qt + m0 // BLOCK_M) * 2)
                q_hi = tl.load(QT + (b * n_qt + m0 // BLOCK_M) * 2 + 1)
                visit = (k_hi >= q_lo) & (k_lo <= q_hi)
            if visit:
                offs_m = m0 + tl.arange(0, BLOCK_M)
                rm = offs_m < Sq
                q = tl.load(Q + b * sqb + offs_m[:, None] * sqs + h * sqh + offs_d[None, :],
                            mask=rm[:, None] & dm[None, :], other=0.0)
                do = tl.load(DO + b * sdob + offs_m[:, None] * sdos + h * sdoh + offs_d[None, :],
                             mask=rm[:, None] & dm[None, :], other=0.0)
                lse = tl.load(LSE + (b * Hq + h) * Sq + offs_m, mask=rm, other=0.0)
                lse = tl.where(lse == -float("inf"), 0.0, lse) * 1.4426950408889634
                delta = tl.load(DELTA + (b * Hq + h) * Sq + offs_m, mask=rm, other=0.0)
                # transposed tile: rows are keys, columns queries
                st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
                ok = nm[:, None] & rm[None, :]
                if CAUSAL:
                    ok = ok & (offs_n[:, None] <= offs_m[None, :])
                if HAS_DOC:
                    qd = tl.load(QD + b * sdqb + offs_m, mask=rm, other=-1)
                    ok = ok & (kd[:, None] == qd[None, :])
                pt = tl.where(ok, tl.math.exp2(st - lse[None, :]), 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
                dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    out_mask = nm[:, None] & dm[None, :]
    # dk/dv are fp32 and contiguous [B, Sk, Hkv, D]
    base = (b * Sk + offs_n[:, None]) * Hkv * D + hk * D + offs_d[None, :]
    tl.store(DK + base, dk * scale, mask=out_mask)
    tl.store(DV + base, dv, mask=out_mask)


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, QD, KD, QT, KT, DQ, qk_scale, scale, Sq, Sk, Hq, n_rep, D, n_qt, n_kt,
            sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdkb,
            CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)  # int64 offsets: B * S * H * D may pass 2**31
    h = bh % Hq
    hk = h // n_rep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < D
    rm = offs_m < Sq
    q = tl.load(Q + b * sqb + offs_m[:, None] * sqs + h * sqh + offs_d[None, :],
                mask=rm[:, None] & dm[None, :], other=0.0)
    do = tl.load(DO + b * sdob + offs_m[:, None] * sdos + h * sdoh + offs_d[None, :],
                 mask=rm[:, None] & dm[None, :], other=0.0)
    lse = tl.load(LSE + bh * Sq + offs_m, mask=rm, other=0.0)
    lse = tl.where(lse == -float("inf"), 0.0, lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=rm, other=0.0)
    if HAS_DOC:
        qd = tl.load(QD + b * sdqb + offs_m, mask=rm, other=-1)
        q_lo = tl.load(QT + (b * n_qt + pid_m) * 2)
        q_hi = tl.load(QT + (b * n_qt + pid_m) * 2 + 1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = Sk
    if CAUSAL:
        end = tl.minimum(Sk, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        visit = True
        if HAS_DOC:
            k_lo = tl.load(KT + (b * n_kt + n0 // BLOCK_N) * 2)
            k_hi = tl.load(KT + (b * n_kt + n0 // BLOCK_N) * 2 + 1)
            visit = (k_hi >= q_lo) & (k_lo <= q_hi)
        if visit:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nm = offs_n < Sk
            k = tl.load(K + b * skb + offs_n[:, None] * sks + hk * skh + offs_d[None, :],
                        mask=nm[:, None] & dm[None, :], other=0.0)
            v = tl.load(V + b * svb + offs_n[:, None] * svs + hk * svh + offs_d[None, :],
                        mask=nm[:, None] & dm[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            ok = rm[:, None] & nm[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            if HAS_DOC:
                kd = tl.load(KD + b * sdkb + offs_n, mask=nm, other=-2)
                ok = ok & (qd[:, None] == kd[None, :])
            p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + (b * Sq + offs_m[:, None]) * Hq * D + h * D + offs_d[None, :], dq * scale,
             mask=rm[:, None] & dm[None, :])


def _blocks(D, dtype, device):
    """(BLOCK_M, BLOCK_N, BLOCK_D): GPU-sized tiles on CUDA, small ones in the interpreter.

    64 x 64 tiles of 2-byte inputs need ~66 KiB of shared memory in backward (head dim 128,
    compiled for sm_90); 4-byte inputs or head dims above 128 halve the tile to stay well under
    the 164-227 KiB an A100/H100 block may use.
    """
    bd = next_pow2(D, 16)
    if torch.device(device).type != "cuda":
        return 16, 16, bd
    wide = bd > 128 or (dtype.itemsize > 2 and bd > 64)
    return (32, 32, bd) if wide else (64, 64, bd)


def tile_ranges(doc: torch.Tensor, block: int) -> torch.Tensor:
    """[min, max] document id of every tile of `block` positions: int64 [B, ceil(S / block), 2].
    The last tile is padded with its last id, which widens no range."""
    B, S = doc.shape
    pad = -S % block
    if pad:
        doc = torch.cat([doc, doc[:, -1:].expand(B, pad)], dim=1)
    t = doc.reshape(B, -1, block)
    return torch.stack([t.amin(-1), t.amax(-1)], dim=-1).to(torch.int64).contiguous()


def tile_counts(q_doc, k_doc, *, causal: bool, block_m: int, block_n: int) -> dict:
    """(query tile, key tile) pairs the forward kernel loops over (`tiles`, summed over rows; the
    causal bound already applied) and how many of them it skips as sharing no document
    (`skipped`), by the kernels' own rule; per head, so multiply by heads for a layer's count."""
    Sq, Sk = q_doc.shape[1], k_doc.shape[1]
    qt, kt = tile_ranges(q_doc, block_m), tile_ranges(k_doc, block_n)
    n_qt, n_kt = qt.shape[1], kt.shape[1]
    m = torch.arange(n_qt)
    end = torch.minimum(torch.full_like(m, Sk), (m + 1) * block_m) if causal else torch.full_like(m, Sk)
    looped = torch.arange(n_kt)[None, :] * block_n < end[:, None]  # [n_qt, n_kt]: the loop's range
    share = (kt[:, None, :, 1] >= qt[:, :, None, 0]) & (kt[:, None, :, 0] <= qt[:, :, None, 1])
    tiles = int(looped.sum()) * q_doc.shape[0]
    visited = int((share & looped[None]).sum())
    return {"tiles": tiles, "visited": visited, "skipped": tiles - visited}


def _prep(q, k, v, q_doc, k_doc, causal, bm, bn):
    _check(q, k, v, q_doc, k_doc)
    check_device(q)
    q, k, v = contiguous_last(q), contiguous_last(k), contiguous_last(v)
    has_doc = q_doc is not None
    qd = q_doc.contiguous() if has_doc else q.new_zeros(1, 1, dtype=torch.int32)
    kd = k_doc.contiguous() if has_doc else qd
    qt = tile_ranges(qd, bm) if has_doc else q.new_zeros(1, 1, 2, dtype=torch.int64)
    kt = tile_ranges(kd, bn) if has_doc else qt
    return q, k, v, qd, kd, qt, kt, has_doc


def attention_fwd(q, k, v, *, causal: bool, scale: float | None = None, q_doc=None, k_doc=None):
    """Triton block attention forward: (out like q, lse [B, Hq, Sq] float32); see module doc."""
    bm, bn, bd = _blocks(q.shape[-1], q.dtype, q.device)
    q, k, v, qd, kd, qt, kt, has_doc = _prep(q, k, v, q_doc, k_doc, causal, bm, bn)
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(-math.inf)
    _fwd[(triton.cdiv(Sq, bm), B * Hq)](
        q, k, v, out, lse, qd, kd, qt, kt, scale * _LOG2E, Sq, Sk, Hq, Hq // Hkv, D, qt.shape[1], kt.shape[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        qd.stride(0), kd.stride(0), CAUSAL=bool(causal), HAS_DOC=has_doc,
        PREC=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, *, causal: bool, scale: float | None = None,
                  q_doc=None, k_doc=None, delta=None):
    """Triton block attention backward: (dq, dk, dv) in float32; lse/delta may be global ones."""
    bm, bn, bd = _blocks(q.shape[-1], q.dtype, q.device)
    q, k, v, qd, kd, qt, kt, has_doc = _prep(q, k, v, q_doc, k_doc, causal, bm, bn)
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    dout = contiguous_last(dout.to(q.dtype))
    if delta is None:
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    delta = delta.float().contiguous()
    lse = lse.float().contiguous()
    dq = torch.zeros((B, Sq, Hq, D), dtype=torch.float32, device=q.device)
    dk = torch.zeros((B, Sk, Hkv, D), dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq, dk, dv
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
               qd.stride(0), kd.stride(0))
    meta = dict(CAUSAL=bool(causal), HAS_DOC=has_doc, PREC=dot_precision(q.dtype),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    _bwd_dkdv[(triton.cdiv(Sk, bn), B * Hkv)](
        q, k, v, dout, lse, delta, qd, kd, qt, kt, dk, dv, scale * _LOG2E, scale, Sq, Sk, Hq, Hkv,
        Hq // Hkv, D, qt.shape[1], kt.shape[1], *strides, **meta)
    _bwd_dq[(triton.cdiv(Sq, bm), B * Hq)](
        q, k, v, dout, lse, delta, qd, kd, qt, kt, dq, scale * _LOG2E, scale, Sq, Sk, Hq, Hq // Hkv, D,
        qt.shape[1], kt.shape[1], *strides, **meta)
    return dq, dk, dv


class _FlashAttention(BlockAttention):
    """BlockAttention over the Triton pair (its own class so a graph shows which path ran)."""


def attention_triton(q, k, v, *, causal: bool, scale: float | None = None, doc_ids=None):
    """Model-level attention on the Triton kernels: q [B, S, Hq, D], k/v [B, S, Hkv, D],
    doc_ids [B, S] keep packed documents apart; same contract as reference.attention_ref."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, doc_ids, doc_ids, bool(causal), scale, attention_fwd,
                                 attention_bwd)
