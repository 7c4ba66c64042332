"""Rotary position embedding in Triton, rotate-half layout, x [B, S, H, D], cos/sin [B, S, D/2].

Forward rotates each pair (x[j], x[j + D/2]) by the angle of (b, s, j); the backward is the
rotation by minus that angle, so one kernel serves both (SIGN = +1 / -1). A program takes a tile
of (b, s, h) rows (about 4096 elements), so small head dims still give wide tiles.
"""
import torch
import triton
import triton.language as tl

from kiln.kernels.triton_util import check_device, next_pow2


@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_rows, S, H, HALF,
                 sxb, sxs, sxh, scb, scs, ssb, sss, syb, sys_, syh,
                 SIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # a tile is BLOCK_R (b, s, h) rows by the D/2 pairs; every row finds its own table row
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < n_rows
    h = rows % H
    s = (rows // H) % S
    b = (rows // H) // S
    j = tl.arange(0, BLOCK_HALF)
    m = rm[:, None] & (j < HALF)[None, :]
    c = tl.load(COS + (b * scb + s * scs)[:, None] + j[None, :], mask=m, other=0.0).to(tl.float32)
    sn = tl.load(SIN + (b * ssb + s * sss)[:, None] + j[None, :], mask=m, other=0.0).to(tl.float32)
    sn = sn * SIGN
    xo = X + (b.to(tl.int64) * sxb + s * sxs + h * sxh)[:, None] + j[None, :]
    x1 = tl.load(xo, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xo + HALF, mask=m, other=0.0).to(tl.float32)
    yo = Y + (b.to(tl.int64) * syb + s * sys_ + h * syh)[:, None] + j[None, :]
    tl.store(yo, (x1 * c - x2 * sn).to(Y.dtype.element_ty), mask=m)
    tl.store(yo + HALF, (x2 * c + x1 * sn).to(Y.dtype.element_ty), mask=m)


def _rotate(x, cos, sin, sign):
    B, S, H, D = x.shape
    half = D // 2
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos = cos.expand(B, S, half)
    sin = sin.expand(B, S, half)
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    y = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    n_rows = B * S * H
    if n_rows and half:
        block_half = next_pow2(half)
        block_r = max(1, min(next_pow2(n_rows), 4096 // block_half))
        _rope_kernel[(triton.cdiv(n_rows, block_r),)](
            x, cos, sin, y, n_rows, S, H, half,
            x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
            sin.stride(0), sin.stride(1), y.stride(0), y.stride(1), y.stride(2),
            SIGN=sign, BLOCK_R=block_r, BLOCK_HALF=block_half)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        check_device(x)
        if x.dim() != 4 or x.shape[-1] % 2 or cos.shape[-1] != x.shape[-1] // 2:
            raise ValueError(f"rope needs x [B, S, H, D] with even D and cos/sin [B, S, D/2] "
                             f"(got x {tuple(x.shape)}, cos {tuple(cos.shape)})")
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # the tables come from integer positions and carry no gradient
        return _rotate(dy, cos, sin, -1), None, None


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, S, H, D] with cos/sin [B|1, S, D/2]; Triton forward and backward."""
    return _Rope.apply(x, cos, sin)
