"""The eager torch path for ops where another arrangement of torch calls is measurably faster
than the plain reference (kiln.kernels.reference stays the test oracle; tests compare the two).

Measured on the tiny recipe's shapes, fp32, 2 CPU threads, forward + backward (bench/throughput.py
has the whole step):
  * attention: SDPA's own GQA (`enable_gqa`) instead of copying K/V to every query head
    (17.0 -> 14.8 ms per layer; with a document mask 24.4 -> 22.6 ms). On CUDA only without a
    mask: masked SDPA there lands on the memory-efficient backend, which does not take the flag
    and would fall back to the math one. In the whole step (bench/throughput.py) ~8 ms of ~450.
  * document masks on CUDA: FlexAttention's block mask (kiln.kernels.flex), compiled, so no
    dense [B, 1, S, S] mask is built and cross-document blocks are skipped (untested here: no
    GPU; on CPU the dense-mask SDPA below stays, see kiln.kernels.flex for why).
  * document masks (CPU): a batch whose rows each hold one document runs as plain causal SDPA
    (no [B, 1, S, S] mask to build and apply). That is 70% of the tiny recipe's 8 x 256 batches
    on the embedded corpus (4.4% of rows cross a boundary), but worth only ~6 ms of ~410 per
    step: CPU flash SDPA with a boundary-free mask costs 13.7 vs 13.0 ms per layer. Splitting
    mixed batches into masked and unmasked rows was tried and gained nothing measurable.
  * RMSNorm and RoPE: autograd Functions with hand-written backwards (RMSNorm: four passes over x
    instead of autograd's ~ten; RoPE: the backward is one rotation by -angle). Together 10-14 ms
    of ~460 in the step (two interleaved A/B runs of 40 steps). The rotation writes both halves in
    place into one output (multiply, then addcmul_) instead of six temporaries and a cat: 0.46 ->
    0.23 ms per call at [8, 256, 4, 64], ~3 ms of ~237 in the step (interleaved A/B, 16 steps).
  * MoE experts: one grouped GEMM (torch's grouped_mm) over all of a layer's experts instead of
    one GEMM per expert, where grouped_mm takes the operands (rows of 16-byte multiples; CPU
    fp32/bf16, CUDA bf16 on sm80+); elsewhere (fp64, odd widths, older GPUs) the per-expert loop.
    Measured: docs/moe.md.
Tried and dropped: RoPE as two full-width multiplies against [cos, cos] / [-sin, sin] is faster
alone (2.5 -> 1.8 ms) but slower inside the step (+15 ms); F.rms_norm (no faster than the
reference here).
"""
import functools
import itertools
import sys

import torch
import torch.nn.functional as F

from kiln.kernels.moe import grouped_linear_ref
from kiln.kernels.reference import attention_mask, attention_ref


def attention_eager(q, k, v, *, causal: bool, scale: float | None = None, doc_ids=None):
    """attention_ref's result; see the module doc for what differs in the computation."""
    if doc_ids is not None and q.device.type != "cpu":
        from kiln.kernels.flex import attention_flex, flex_available

        if q.device.type == "cuda" and flex_available():  # block mask: no dense [B, 1, S, S] mask
            return attention_flex(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)
        return attention_ref(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)
    # every row holds one document: nothing to mask (not under torch.compile, where the
    # data-dependent branch would break the block's graph)
    if doc_ids is not None and not torch.compiler.is_compiling() \
            and bool((doc_ids == doc_ids[:, :1]).all()):
        doc_ids = None
    return _sdpa(q, k, v, causal, scale, doc_ids)


def _missing(feature: str, fallback: str) -> None:
    """Say once, in one line, that this torch lacks a feature and what runs instead."""
    if feature not in _SAID:
        _SAID.add(feature)
        print(f"kiln: torch {torch.__version__} has no {feature}; {fallback}", file=sys.stderr, flush=True)


_SAID: set = set()


@functools.cache
def sdpa_takes_gqa() -> bool:
    """Whether this torch's SDPA has `enable_gqa` (torch >= 2.5)."""
    try:
        t = torch.zeros(1, 2, 1, 8)
        F.scaled_dot_product_attention(t, t[:, :1], t[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


def grouped_mm_fn():
    """torch's grouped GEMM: F.grouped_mm (public since torch 2.10), torch._grouped_mm before, else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _sdpa(q, k, v, causal, scale, doc_ids):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if gqa and not sdpa_takes_gqa():
        _missing("SDPA enable_gqa", "K/V heads are copied to every query head (attention_ref)")
        return attention_ref(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)
    if doc_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
    else:
        mask = attention_mask(q.shape[1], k.shape[1], causal, doc_ids, doc_ids, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


class _EagerRMSNorm(torch.autograd.Function):
    """RMSNorm with a hand-written backward: four passes over x instead of autograd's ten."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        xr = xf * r
        ctx.save_for_backward(xr, weight, r)
        ctx.in_dtype = x.dtype
        return (xr * weight.to(xr.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        xr, weight, r = ctx.saved_tensors
        g = g.to(xr.dtype)
        gw = g * weight.to(xr.dtype)
        # dx = r * (gw - xr * mean(gw * xr)); dw = sum over rows of g * xr
        dot = torch.linalg.vecdot(gw, xr, dim=-1).unsqueeze(-1).div_(-xr.shape[-1])
        dx = torch.addcmul(gw, xr, dot).mul_(r)
        dw = (g * xr).reshape(-1, xr.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx.to(ctx.in_dtype), (dw.to(weight.dtype) if dw is not None else None), None


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_ref's result (computed in fp32 for half inputs), with a fused-pass backward."""
    return _EagerRMSNorm.apply(x, weight, eps)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if torch.compiler.is_compiling():  # inductor fuses this itself (and fails on the out= form)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    # each half written in place into one output: two passes per half, no temporaries, no cat
    out = torch.empty_like(x)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _EagerRope(torch.autograd.Function):
    """RoPE whose backward is the rotation by -angle (one rotation instead of autograd's graph)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        c, s = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
        ctx.save_for_backward(c, s)
        return _rotate(x, c, s)

    @staticmethod
    def backward(ctx, g):
        c, s = ctx.saved_tensors
        return _rotate(g, c, -s), None, None


def rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope_ref's result; cos/sin [B, S, D/2] are tables (no gradient flows to them)."""
    return _EagerRope.apply(x, cos, sin)


def _grouped_mm_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped_mm runs these operands: rows of 16-byte multiples on both devices,
    fp32 or bf16 on CPU, bf16 on CUDA sm80+."""
    if x.dtype != w.dtype or x.shape[0] == 0:
        return False
    if not hasattr(F, "grouped_mm"):  # torch < 2.10: torch._grouped_mm ran on sm90 only, no CPU kernel in 2.8
        if x.device.type == "cuda" and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 \
                and torch.cuda.get_device_capability(x.device)[0] == 9:
            return not (x.shape[1] * x.element_size() % 16 or w.shape[1] * x.element_size() % 16)
        _missing("F.grouped_mm", "MoE experts run one GEMM per expert")
        return False
    if any(n * x.element_size() % 16 for n in (x.shape[1], w.shape[1])):
        return False
    if x.data_ptr() % 16 or w.data_ptr() % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def grouped_linear_eager(x: torch.Tensor, w: torch.Tensor, sizes: list, ids) -> torch.Tensor:
    """grouped_linear_ref's result from one grouped GEMM where grouped_mm takes the operands."""
    if not _grouped_mm_takes(x, w):
        return grouped_linear_ref(x, w, sizes, ids)
    ids = list(ids)
    first = ids[0] if ids else 0
    # a layer's experts sit in consecutive rows of w (the bank's dispatch order): a view, no copy
    wg = w[first:first + len(ids)] if ids == list(range(first, first + len(ids))) else w[ids]
    # CUDA: every group starts on a 16-byte row boundary. The weight gradient contracts over rows,
    # and the kernel wants each group's first row there (torchtitan pads its token groups alike).
    # The CPU kernel has no such rule; tests run the padding on CPU through `align`.
    return _grouped_mm(x, wg, sizes, 16 // x.element_size() if x.device.type == "cuda" else 1)


def _grouped_mm(x, wg, sizes: list, align: int):
    """grouped_mm over groups of `sizes` rows, each padded with zero rows to a multiple of `align`
    (zero rows add nothing to any gradient; their outputs are dropped)."""
    padded = [-(-n // align) * align for n in sizes]
    rows = None
    if padded != list(sizes):
        starts = torch.tensor(list(itertools.accumulate([0] + padded[:-1])), device=x.device)
        counts = torch.tensor(list(sizes), device=x.device)
        first = counts.cumsum(0) - counts
        rows = torch.arange(x.shape[0], device=x.device) + \
            torch.repeat_interleave(starts - first, counts, output_size=x.shape[0])
        x = x.new_zeros(sum(padded), x.shape[1]).index_copy(0, rows, x)
    offs = torch.tensor(list(itertools.accumulate(padded)), dtype=torch.int32, device=x.device)
    y = grouped_mm_fn()(x.contiguous(), wg.transpose(-2, -1), offs=offs)
    if y.requires_grad:
        # grouped_mm's backward rejects an expanded gradient (e.g. from a sum): hand it a dense one
        y.register_hook(lambda g: g.contiguous())
    return y if rows is None else y.index_select(0, rows)
