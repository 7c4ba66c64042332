"""MoE permute / unpermute: the torch reference against a plain loop, the Triton kernels
(interpreter, fp32) against the reference in fp64, forward and gradients for x, y_perm, weights."""
import pytest
import torch

from kiln.kernels.moe import moe_permute_ref, moe_unpermute_ref

TOL = dict(atol=1e-5, rtol=1e-5)  # copies are exact; weighted sums of k <= 4 rows round ~1e-7


def _routing(n, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    # k distinct experts per token, as a top-k router gives; expert e-1 left empty on purpose
    idx = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(n)])
    return idx, torch.rand(n, k, generator=g, dtype=torch.float64)


def test_reference_layout_matches_loop():
    idx, _ = _routing(23, 3, 6, seed=0)
    x = torch.arange(23, dtype=torch.float64)[:, None].expand(23, 4).clone()
    xp, counts, row_map = moe_permute_ref(x, idx, 6)
    expected = [n for e in range(6) for n in range(23) if e in idx[n].tolist()]  # expert-major, stable
    assert xp[:, 0].long().tolist() == expected
    assert counts.tolist() == [int((idx == e).sum()) for e in range(6)] and counts[5] == 0
    for n in range(23):
        for c in range(3):
            assert int(xp[row_map[n, c], 0]) == n
            assert sum(counts[: idx[n, c]].tolist()) <= row_map[n, c] < sum(counts[: idx[n, c] + 1].tolist())


def test_reference_unpermute_inverts_permute_with_unit_weights():
    idx, _ = _routing(17, 2, 5, seed=1)
    x = torch.randn(17, 9, dtype=torch.float64)
    xp, _, row_map = moe_permute_ref(x, idx, 5)
    torch.testing.assert_close(moe_unpermute_ref(xp, row_map, torch.full((17, 2), 0.5, dtype=torch.float64)), x)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("n,k,e,d", [(37, 3, 5, 45), (50, 1, 4, 123), (13, 4, 9, 300)])
def test_triton_matches_reference(n, k, e, d):
    from kiln.kernels.moe_triton import moe_permute_triton, moe_unpermute_triton
    idx, w = _routing(n, k, e, seed=n)
    g = torch.Generator().manual_seed(d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    lin = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5  # a stand-in expert
    dout = torch.randn(n, d, generator=g, dtype=torch.float64)

    def run(permute, unpermute, dtype):
        xx, ww = x.to(dtype, copy=True).requires_grad_(), w.to(dtype, copy=True).requires_grad_()
        xp, counts, row_map = permute(xx, idx, e)
        yp = torch.tanh(xp @ lin.to(dtype))
        yp.retain_grad()
        out = unpermute(yp, row_map, ww)
        out.backward(dout.to(dtype))
        return xp, counts, row_map, out, xx.grad, ww.grad, yp.grad

    got = run(moe_permute_triton, moe_unpermute_triton, torch.float32)
    ref = run(moe_permute_ref, moe_unpermute_ref, torch.float64)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    for name, a, b in zip(["x_perm", "out", "dx", "dweights", "dy_perm"], got[:1] + got[3:], ref[:1] + ref[3:]):
        torch.testing.assert_close(a.double(), b.detach(), **TOL, msg=lambda m: f"{name}: {m}")


def _groups(sizes, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=g, dtype=torch.float64)
    w = torch.randn(len(sizes) + 3, n, k, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype)


@pytest.mark.parametrize("sizes,ids", [
    ([5, 0, 9, 3], [0, 1, 2, 3]),      # an empty group, ids from 0
    ([4, 7, 2], [3, 4, 5]),            # a later layer's consecutive bank rows (a view of w)
    ([6, 1, 0, 8, 2], [5, 0, 6, 2, 1]),  # any slot order (gathered rows of w)
    ([4, 8, 0, 12], [0, 1, 2, 3]),     # groups already on 16-byte boundaries: no padding rows
])
def test_grouped_linear_matches_per_group_loop_fp64(sizes, ids):
    """The grouped GEMM (fp32) against the per-group loop in fp64: output and both gradients."""
    from kiln.kernels.eager import _grouped_mm_takes, grouped_linear_eager
    from kiln.kernels.moe import grouped_linear_ref

    x64, w64 = _groups(sizes, 24, 16, torch.float64, seed=len(ids))
    x32, w32 = (t.float().requires_grad_() for t in (x64, w64))
    assert _grouped_mm_takes(x32, w32)  # this test exercises torch's grouped_mm, not the loop
    x64.requires_grad_(), w64.requires_grad_()
    y32, y64 = grouped_linear_eager(x32, w32, sizes, ids), grouped_linear_ref(x64, w64, sizes, ids)
    g = torch.randn(y64.shape, dtype=torch.float64)
    y32.backward(g.float())
    y64.backward(g)
    tol = dict(atol=1e-4, rtol=1e-5)  # fp32 sums of 16-24 products against fp64
    torch.testing.assert_close(y32.double(), y64.detach(), **tol)
    torch.testing.assert_close(x32.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(w32.grad.double(), w64.grad, **tol)
    unused = [e for e in range(w64.shape[0]) if e not in ids]
    assert w32.grad[unused].abs().max() == 0


@pytest.mark.parametrize("align", [4, 8])
def test_grouped_mm_with_groups_padded_to_row_boundaries(align):
    """The CUDA path pads each group to a multiple of 16 bytes of rows; the same code on CPU."""
    from kiln.kernels.eager import _grouped_mm
    from kiln.kernels.moe import grouped_linear_ref

    sizes = [5, 0, 9, 3, 8]
    x64, w64 = _groups(sizes, 24, 16, torch.float64, seed=11)
    x32, w32 = (t.float().requires_grad_() for t in (x64, w64))
    x64.requires_grad_(), w64.requires_grad_()
    y32 = _grouped_mm(x32, w32[:5], sizes, align)
    y64 = grouped_linear_ref(x64, w64, sizes, range(5))
    g = torch.randn(y64.shape, dtype=torch.float64)
    y32.backward(g.float())
    y64.backward(g)
    tol = dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y32.double(), y64.detach(), **tol)
    torch.testing.assert_close(x32.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(w32.grad.double(), w64.grad, **tol)


def test_grouped_linear_takes_an_expanded_gradient_and_bf16():
    from kiln.kernels.eager import grouped_linear_eager
    from kiln.kernels.moe import grouped_linear_ref

    sizes, ids = [3, 0, 5], [0, 1, 2]
    x, w = (t.requires_grad_() for t in _groups(sizes, 16, 8, torch.float32, seed=7))
    grouped_linear_eager(x, w, sizes, ids).sum().backward()  # the gradient is a stride-0 expand
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    grouped_linear_ref(xr, wr, sizes, ids).sum().backward()
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    yb = grouped_linear_eager(xb, wb, sizes, ids)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), grouped_linear_ref(xb.double(), wb.double(), sizes, ids),
                               atol=2e-2, rtol=1e-2)  # bf16 products, fp32 accumulation


@pytest.mark.parametrize("dtype,n,k", [(torch.float64, 8, 8), (torch.float32, 6, 8), (torch.float32, 8, 6)])
def test_grouped_linear_falls_back_to_the_loop(dtype, n, k):
    """fp64, and fp32 rows that are not 16-byte multiples (grouped_mm rejects them), take the loop."""
    from kiln.kernels.eager import _grouped_mm_takes, grouped_linear_eager
    from kiln.kernels.moe import grouped_linear_ref

    x, w = (t.requires_grad_() for t in _groups([2, 4], n, k, dtype, seed=3))
    assert not _grouped_mm_takes(x, w)
    y = grouped_linear_eager(x, w, [2, 4], [1, 0])
    assert torch.equal(y, grouped_linear_ref(x, w, [2, 4], [1, 0]))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad[2:].abs().max() == 0
