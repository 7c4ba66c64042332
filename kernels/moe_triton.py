"""MoE permute / unpermute in Triton: the row gather/scatter (with routing weights) as kernels.

Semantics as in moe.py (the torch reference). Every map is a permutation of the N*k rows, so the
scatter kernels write each destination row exactly once: no atomics, deterministic.
Permute backward is the weight-free gather-sum; unpermute backward scatters w * dout and takes
the routing-weight gradient <dout[n], y_perm[row_map[n, c]]> in the same pass.
"""
import torch
import triton
import triton.language as tl

from kiln.kernels.moe import permute_indices
from kiln.kernels.triton_util import check_device, next_pow2, row_programs


@triton.jit
def _scatter_rows(SRC, MAP, W, DST, Y, DW, N, D, K,
                  HAS_W: tl.constexpr, WANT_DOT: tl.constexpr, BLOCK_D: tl.constexpr):
    """DST[MAP[n, c]] = W[n, c] * SRC[n]; optionally DW[n, c] = <SRC[n], Y[MAP[n, c]]>."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_D)
    for n in range(pid, N, progs):
        n64 = tl.cast(n, tl.int64)
        for c in range(0, K):
            r = tl.load(MAP + n64 * K + c)
            w = 1.0
            if HAS_W:
                w = tl.load(W + n64 * K + c).to(tl.float32)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + cols0
                cm = cols < D
                x = tl.load(SRC + n64 * D + cols, mask=cm, other=0.0).to(tl.float32)
                tl.store(DST + r * D + cols, (x * w).to(DST.dtype.element_ty), mask=cm)
                if WANT_DOT:
                    acc += x * tl.load(Y + r * D + cols, mask=cm, other=0.0).to(tl.float32)
            if WANT_DOT:
                tl.store(DW + n64 * K + c, tl.sum(acc, axis=0).to(DW.dtype.element_ty))


@triton.jit
def _gather_sum(SRC, MAP, W, OUT, N, D, K, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[n] = sum_c W[n, c] * SRC[MAP[n, c]] (W = 1 without HAS_W)."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_D)
    for n in range(pid, N, progs):
        n64 = tl.cast(n, tl.int64)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + cols0
            cm = cols < D
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for c in range(0, K):
                r = tl.load(MAP + n64 * K + c)
                y = tl.load(SRC + r * D + cols, mask=cm, other=0.0).to(tl.float32)
                if HAS_W:
                    y = y * tl.load(W + n64 * K + c).to(tl.float32)
                acc += y
            tl.store(OUT + n64 * D + cols, acc.to(OUT.dtype.element_ty), mask=cm)


def _block_d(D, device):
    return min(next_pow2(D, 16), 1024 if torch.device(device).type == "cuda" else 256)


def _scatter(src, row_map, w, want_dot_with=None):
    N, K = row_map.shape
    D = src.shape[1]
    dst = torch.empty((N * K, D), dtype=src.dtype, device=src.device)
    dw = torch.empty((N, K), dtype=w.dtype, device=src.device) if want_dot_with is not None else None
    if N and D:
        _scatter_rows[(row_programs(N, src.device),)](
            src, row_map, w if w is not None else src, dst,
            want_dot_with if want_dot_with is not None else src, dw if dw is not None else src,
            N, D, K, HAS_W=w is not None, WANT_DOT=want_dot_with is not None,
            BLOCK_D=_block_d(D, src.device))
    return dst, dw


def _gather(src, row_map, w, out_dtype):
    N, K = row_map.shape
    D = src.shape[1]
    out = torch.empty((N, D), dtype=out_dtype, device=src.device)
    if N and D:
        _gather_sum[(row_programs(N, src.device),)](
            src, row_map, w if w is not None else src, out, N, D, K, HAS_W=w is not None,
            BLOCK_D=_block_d(D, src.device))
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_map):
        ctx.save_for_backward(row_map)
        return _scatter(x.contiguous(), row_map, None)[0]

    @staticmethod
    def backward(ctx, dxp):
        (row_map,) = ctx.saved_tensors
        return _gather(dxp.contiguous(), row_map, None, dxp.dtype), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm, row_map, weights):
        y_perm, weights = y_perm.contiguous(), weights.contiguous()
        ctx.save_for_backward(y_perm, row_map, weights)
        return _gather(y_perm, row_map, weights, y_perm.dtype)

    @staticmethod
    def backward(ctx, dout):
        y_perm, row_map, weights = ctx.saved_tensors
        dy, dw = _scatter(dout.contiguous(), row_map, weights,
                          want_dot_with=y_perm if ctx.needs_input_grad[2] else None)
        return dy, None, dw


def moe_permute_triton(x: torch.Tensor, expert_idx: torch.Tensor, num_experts: int):
    """Triton moe_permute: (x_perm [N*k, D], tokens_per_expert [E], row_map [N, k])."""
    check_device(x)
    row_map, counts = permute_indices(expert_idx, num_experts)
    return _Permute.apply(x, row_map.contiguous()), counts, row_map


def moe_unpermute_triton(y_perm: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor):
    """Triton moe_unpermute: out[n] = sum_c weights[n, c] * y_perm[row_map[n, c]]."""
    check_device(y_perm)
    return _Unpermute.apply(y_perm, row_map.long().contiguous(), weights)
