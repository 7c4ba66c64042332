"""SwiGLU in Triton: y = silu(g) * u, elementwise, recomputing sigmoid(g) in backward.

dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g);  du = dy * g * s.  Math in fp32.
"""
import torch
import triton
import triton.language as tl

from kiln.kernels.triton_util import check_device

_BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2**31
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + offs, (g * s * u).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2**31
    m = offs < n
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=m)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=m)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        check_device(gate)
        if gate.shape != up.shape:
            raise ValueError(f"swiglu needs gate and up of one shape (got {tuple(gate.shape)} and "
                             f"{tuple(up.shape)})")
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](g, u, y, n, BLOCK=_BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dy, g, u, dg, du, n, BLOCK=_BLOCK)
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with Triton forward and backward (gate and up of one shape)."""
    return _SwiGLU.apply(gate, up)
