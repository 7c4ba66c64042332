"""RMSNorm in Triton: forward saves 1/rms per row; backward gives dx and the weight gradient.

y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps), all math in fp32.
dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), dw = sum_rows dy * xhat, with xhat = x * rstd.
"""
import torch
import triton
import triton.language as tl

from kiln.kernels.triton_util import check_device, next_pow2, row_programs


@triton.jit
def _rms_fwd(X, W, Y, RSTD, n_rows, D, stride_x, stride_y, eps,
             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    for r0 in range(pid * BLOCK_R, n_rows, progs * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        m = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(RSTD + rows, rstd, mask=rmask)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd(DY, X, W, RSTD, DX, DW_PART, n_rows, D, stride_dy, stride_x, stride_dx,
             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in range(pid * BLOCK_R, n_rows, progs * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        m = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        dyw = dy * w[None, :]
        c = tl.sum(dyw * xhat, axis=1) / D
        dx = (dyw - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
        dw += dy * xhat
    # one partial weight gradient per program; the host sums them (deterministic, no atomics)
    tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=cmask)


def _tiles(n_rows, D, device):
    """(programs, BLOCK_R, BLOCK_D): rows per tile so one tile holds about 4096 elements."""
    block_d = next_pow2(D)
    block_r = max(1, min(next_pow2(n_rows), 4096 // block_d))
    return row_programs(triton.cdiv(n_rows, block_r), device), block_r, block_d


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        check_device(x)
        shape, D = x.shape, x.shape[-1]
        x2 = _rows(x)
        w = weight.contiguous()
        y = torch.empty((x2.shape[0], D), dtype=x.dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        progs, block_r, block_d = _tiles(x2.shape[0], D, x.device)
        if x2.shape[0] > 0:
            _rms_fwd[(progs,)](x2, w, y, rstd, x2.shape[0], D, x2.stride(0), y.stride(0), float(eps),
                               BLOCK_R=block_r, BLOCK_D=block_d)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        D = x2.shape[1]
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        progs, block_r, block_d = _tiles(x2.shape[0], D, x2.device)
        dw_part = torch.zeros((progs, D), dtype=torch.float32, device=x2.device)
        if x2.shape[0] > 0:
            _rms_bwd[(progs,)](dy2, x2, w, rstd, dx, dw_part, x2.shape[0], D, dy2.stride(0),
                               x2.stride(0), dx.stride(0), BLOCK_R=block_r, BLOCK_D=block_d)
        return dx.reshape(ctx.shape), dw_part.sum(0).to(w.dtype), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x times weight [D]; Triton forward and backward."""
    return _RMSNorm.apply(x, weight, eps)
