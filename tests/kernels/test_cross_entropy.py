"""Fused linear + cross-entropy: Triton (interpreter, fp32) and the chunked torch path against
full-logits F.cross_entropy in fp64, with ignored rows, z-loss and chunk edges."""
import pytest
import torch

from kiln.kernels.cross_entropy import linear_cross_entropy_ref, naive_linear_cross_entropy

# fp32 vs fp64: logsumexp over <= 1031 logits and chunk sums stay within ~1e-6 relative.
TOL32 = dict(atol=1e-4, rtol=1e-4)
TOL64 = dict(atol=1e-10, rtol=1e-10)  # torch path run in fp64: same math, rounding only


def _data(n, d, v, ignore_every, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


def _check(fn, h, w, y, z, tol, dtype, **kw):
    """Loss and both gradients of fn (in dtype) vs naive fp64, under a non-unit upstream grad."""
    a, b = h.to(dtype, copy=True).requires_grad_(), w.to(dtype, copy=True).requires_grad_()
    a64, b64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(a, b, y, z_loss=z, **kw)
    ref = naive_linear_cross_entropy(a64, b64, y, z_loss=z)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    (loss * 1.7).backward()
    (ref * 1.7).backward()
    torch.testing.assert_close(a.grad.double(), a64.grad, **tol)
    torch.testing.assert_close(b.grad.double(), b64.grad, **tol)


CASES = [  # n, d, vocab, ignore every k-th row, z_loss, chunk
    (37, 24, 123, 5, 0.0, 16),
    (37, 24, 1031, 3, 1e-3, 16),
    (20, 17, 1031, 0, 0.1, 7),
    (9, 8, 123, 2, 1e-4, 64),  # one chunk larger than the batch
]


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("n,d,v,ign,z,chunk", CASES)
def test_triton_matches_fp64(n, d, v, ign, z, chunk):
    from kiln.kernels.cross_entropy_triton import linear_cross_entropy_triton
    h, w, y = _data(n, d, v, ign, seed=n + v)
    _check(linear_cross_entropy_triton, h, w, y, z, TOL32, torch.float32, chunk=chunk)


@pytest.mark.parametrize("n,d,v,ign,z,chunk", CASES)
def test_torch_chunked_matches_fp64(n, d, v, ign, z, chunk):
    h, w, y = _data(n, d, v, ign, seed=n + v)
    _check(linear_cross_entropy_ref, h, w, y, z, TOL64, torch.float64, chunk=chunk)
    _check(linear_cross_entropy_ref, h, w, y, z, TOL32, torch.float32, chunk=chunk)


@pytest.mark.usefixtures("interp")
def test_all_ignored_gives_zero_loss_and_grads():
    from kiln.kernels.cross_entropy_triton import linear_cross_entropy_triton
    h, w, y = _data(6, 8, 50, 0, seed=1)
    y[:] = -100
    for fn in (linear_cross_entropy_triton, linear_cross_entropy_ref):
        a, b = h.float().requires_grad_(), w.float().requires_grad_()
        loss = fn(a, b, y, chunk=4)
        loss.backward()
        assert loss.item() == 0.0
        assert a.grad.abs().max() == 0 and b.grad.abs().max() == 0


@pytest.mark.usefixtures("interp")
def test_only_weight_grad_and_no_grad():
    from kiln.kernels.cross_entropy_triton import linear_cross_entropy_triton
    h, w, y = _data(10, 8, 77, 4, seed=2)
    b = w.float().requires_grad_()
    loss = linear_cross_entropy_triton(h.float(), b, y, chunk=3)
    loss.backward()
    b64 = w.clone().requires_grad_()
    naive_linear_cross_entropy(h, b64, y).backward()
    torch.testing.assert_close(b.grad.double(), b64.grad, **TOL32)
    with torch.no_grad():
        plain = linear_cross_entropy_triton(h.float(), w.float(), y, chunk=3)
    torch.testing.assert_close(plain.double(), naive_linear_cross_entropy(h, w, y), **TOL32)
