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
