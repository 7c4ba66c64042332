"""Block attention, torch path: the per-block forward/backward of the ring algorithms.

Flash-attention style interface: the forward returns the output and the log-sum-exp (lse) of
each query row, the backward accepts a *global* lse and delta = rowsum(dO * O) so that a ring
algorithm can run it block by block and the block gradients add up to the exact gradient.

Shapes: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], Hq % Hkv == 0 (grouped-query attention: query
head h reads kv head h // (Hq // Hkv)). lse and delta are [B, Hq, Sq].
Masks: `causal` is top-left aligned (query i sees keys j <= i); q_doc [B, Sq] / k_doc [B, Sk]
restrict attention to equal document ids. A row that sees no key gets lse = -inf and out = 0.

Memory is O(block): queries are processed in tiles of rows so that no score matrix larger than
tile x Sk (per head) is ever materialised. Arithmetic is float32 (float64 for float64 inputs).
"""
import torch

# Upper bound on score-tile elements (B * Hq * rows * Sk); 2**24 floats = 64 MiB in fp32.
_TILE_ELEMS = 1 << 24
_MAX_ROWS = 256
_MIN_ROWS = 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for inputs of `dtype`: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(q, k, v, q_doc, k_doc):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-d [B, S, H, D] tensors, got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} "
                         f"vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q{tuple(q.shape)} and k{tuple(k.shape)} differ in batch or head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if (q_doc is None) != (k_doc is None):
        raise ValueError("pass both q_doc and k_doc, or neither")
    if q_doc is not None and (q_doc.shape != q.shape[:2] or k_doc.shape != k.shape[:2]):
        raise ValueError(f"doc ids must be [B, S]: q_doc{tuple(q_doc.shape)} "
                         f"k_doc{tuple(k_doc.shape)}")


def _rows_per_tile(batch: int, heads: int, sk: int, q_chunk) -> int:
    if q_chunk:
        return int(q_chunk)
    rows = _TILE_ELEMS // max(1, batch * heads * sk)
    return max(_MIN_ROWS, min(_MAX_ROWS, rows))


class _Blocks:
    """Inputs rearranged once to [B, Hkv, ...] with the G query heads of a kv head adjacent."""

    def __init__(self, q, k, v, causal, q_doc, k_doc, q_chunk):
        self.cd = compute_dtype(q.dtype)
        self.B, self.Sq, self.Hq, self.D = q.shape
        self.Sk, self.Hkv = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.causal, self.q_doc, self.k_doc = causal, q_doc, k_doc
        # q as [B, Hkv, G, Sq, D]: a row tile reshapes to [B, Hkv, G*rows, D], so one batched
        # matmul per kv head serves all its query heads without repeating K/V.
        q5 = q.to(self.cd).reshape(self.B, self.Sq, self.Hkv, self.G, self.D)
        self.q = q5.permute(0, 2, 3, 1, 4)
        self.k = k.to(self.cd).transpose(1, 2).contiguous()  # [B, Hkv, Sk, D]
        self.v = v.to(self.cd).transpose(1, 2).contiguous()
        self.rows = _rows_per_tile(self.B, self.Hq, self.Sk, q_chunk)

    def tiles(self):
        """Yield (i0, i1, kend): query rows [i0, i1) need keys [0, kend) (causal skips the rest)."""
        for i0 in range(0, self.Sq, self.rows):
            i1 = min(i0 + self.rows, self.Sq)
            yield i0, i1, (min(i1, self.Sk) if self.causal else self.Sk)

    def q_tile(self, t, i0, i1):
        return t[:, :, :, i0:i1].reshape(self.B, self.Hkv, self.G * (i1 - i0), t.shape[-1])

    def scores(self, i0, i1, kend, scale):
        """Masked scores [B, Hkv, G, rows, kend] (-inf where masked)."""
        s = torch.matmul(self.q_tile(self.q, i0, i1), self.k[:, :, :kend].transpose(-1, -2))
        s = s.view(self.B, self.Hkv, self.G, i1 - i0, kend).mul_(scale)
        allowed = None
        if self.causal and i0 < kend - 1:  # tiles entirely below the diagonal need no mask
            qi = torch.arange(i0, i1, device=s.device)[:, None]
            allowed = (torch.arange(kend, device=s.device)[None, :] <= qi)[None]
        if self.q_doc is not None:
            same = self.q_doc[:, i0:i1, None] == self.k_doc[:, None, :kend]
            allowed = same if allowed is None else allowed & same
        if allowed is not None:
            s.masked_fill_(~allowed[:, None, None], float("-inf"))
        return s


def _safe(lse):
    # exp(s - lse) with lse = -inf (row saw nothing) would be exp(nan); all its s are -inf too,
    # so subtracting 0 instead gives the correct p = 0.
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def attention_fwd(q, k, v, *, causal: bool, scale: float, q_doc=None, k_doc=None, q_chunk=None):
    """Block attention forward. Returns (out like q, lse [B, Hq, Sq] in float32/float64).

    `q_chunk` overrides the number of query rows per tile (tests use it to force tiling).
    """
    _check(q, k, v, q_doc, k_doc)
    b = _Blocks(q, k, v, causal, q_doc, k_doc, q_chunk)
    out = torch.zeros(b.B, b.Hkv, b.G, b.Sq, b.D, dtype=b.cd, device=q.device)
    lse = torch.full((b.B, b.Hkv, b.G, b.Sq), float("-inf"), dtype=b.cd, device=q.device)
    for i0, i1, kend in b.tiles():
        if kend == 0:
            continue
        s = b.scores(i0, i1, kend, scale)
        m = torch.logsumexp(s, dim=-1)
        p = s.sub_(_safe(m).unsqueeze(-1)).exp_()
        rows = i1 - i0
        o = torch.matmul(p.view(b.B, b.Hkv, b.G * rows, kend), b.v[:, :, :kend])
        out[:, :, :, i0:i1] = o.view(b.B, b.Hkv, b.G, rows, b.D)
        lse[:, :, :, i0:i1] = m
    out = out.permute(0, 3, 1, 2, 4).reshape(b.B, b.Sq, b.Hq, b.D).to(q.dtype)
    return out, lse.view(b.B, b.Hq, b.Sq)


def attention_bwd(dout, q, k, v, out, lse, *, causal: bool, scale: float, q_doc=None, k_doc=None,
                  delta=None, q_chunk=None):
    """Block attention backward. Returns (dq, dk, dv) in float32 (float64 for float64 inputs).

    `lse` [B, Hq, Sq] may be the log-sum-exp of the *whole* attention row (all blocks) and
    `delta` [B, Hq, Sq] = rowsum(dout * out) of the whole output; then dq/dk/dv are this block's
    exact share of the full gradient. Gradients stay in the arithmetic dtype so ring callers
    accumulate without rounding; dk/dv of a kv head sum over the query heads sharing it.
    """
    _check(q, k, v, q_doc, k_doc)
    b = _Blocks(q, k, v, causal, q_doc, k_doc, q_chunk)
    if delta is None:
        delta = (dout.to(b.cd) * out.to(b.cd)).sum(-1).transpose(1, 2)
    delta = delta.to(b.cd).reshape(b.B, b.Hkv, b.G, b.Sq)
    lse = _safe(lse.to(b.cd)).reshape(b.B, b.Hkv, b.G, b.Sq)
    do = dout.to(b.cd).reshape(b.B, b.Sq, b.Hkv, b.G, b.D).permute(0, 2, 3, 1, 4)
    dq = torch.zeros(b.B, b.Hkv, b.G, b.Sq, b.D, dtype=b.cd, device=q.device)
    dk = torch.zeros(b.B, b.Hkv, b.Sk, b.D, dtype=b.cd, device=q.device)
    dv = torch.zeros_like(dk)
    for i0, i1, kend in b.tiles():
        if kend == 0:
            continue
        rows = i1 - i0
        p = b.scores(i0, i1, kend, scale).sub_(lse[:, :, :, i0:i1, None]).exp_()
        p2 = p.view(b.B, b.Hkv, b.G * rows, kend)
        do_t = b.q_tile(do, i0, i1)
        dv[:, :, :kend] += torch.matmul(p2.transpose(-1, -2), do_t)
        dp = torch.matmul(do_t, b.v[:, :, :kend].transpose(-1, -2)).view_as(p)
        ds = p.mul_(dp.sub_(delta[:, :, :, i0:i1, None])).view_as(p2)  # p is dead after this
        dq[:, :, :, i0:i1] = torch.matmul(ds, b.k[:, :, :kend]).view(b.B, b.Hkv, b.G, rows, b.D)
        dk[:, :, :kend] += torch.matmul(ds.transpose(-1, -2), b.q_tile(b.q, i0, i1))
    dq = dq.mul_(scale).permute(0, 3, 1, 2, 4).reshape(b.B, b.Sq, b.Hq, b.D)
    return dq, dk.mul_(scale).transpose(1, 2), dv.transpose(1, 2)


class BlockAttention(torch.autograd.Function):
    """Attention as one autograd node over a functional (fwd, bwd) pair: the torch pair above or
    the Triton pair in flash_attention.py, which share this wrapper."""

    @staticmethod
    def forward(ctx, q, k, v, q_doc, k_doc, causal, scale, fwd=None, bwd=None):
        fwd, bwd = fwd or attention_fwd, bwd or attention_bwd
        out, lse = fwd(q, k, v, causal=causal, scale=scale, q_doc=q_doc, k_doc=k_doc)
        ctx.save_for_backward(q, k, v, out, lse, q_doc, k_doc)
        ctx.causal, ctx.scale, ctx.bwd = causal, scale, bwd
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, q_doc, k_doc = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(dout, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale,
                             q_doc=q_doc, k_doc=k_doc)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def attention(q, k, v, *, causal: bool, scale: float | None = None, q_doc=None, k_doc=None):
    """Differentiable block attention (forward/backward above); scale defaults to D**-0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return BlockAttention.apply(q, k, v, q_doc, k_doc, causal, scale)
