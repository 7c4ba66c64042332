"""RMSNorm, SwiGLU and RoPE Triton kernels (interpreter, fp32) against fp64 torch references."""
import pytest
import torch

from kiln.kernels.reference import rms_norm_ref, rope_cos_sin, rope_ref, swiglu_ref

pytestmark = pytest.mark.usefixtures("interp")

# fp32 kernel vs fp64 reference: elementwise results agree to ~1e-6; sums over rows (the RMSNorm
# weight gradient over 615 rows) collect a few 1e-6 more. 1e-4 leaves room without hiding bugs.
TOL = dict(atol=1e-4, rtol=1e-4)


def _compare(fn, ref, inputs, seed=0):
    """Forward and every input gradient of fn (fp32) vs ref (fp64) for a random upstream grad."""
    a32 = [t.float().clone().requires_grad_() for t in inputs]
    a64 = [t.double().clone().requires_grad_() for t in inputs]
    y32, y64 = fn(*a32), ref(*a64)
    assert y32.dtype == torch.float32 and y32.shape == y64.shape
    torch.testing.assert_close(y32.double(), y64.detach(), **TOL)
    g = torch.randn(y64.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y32.backward(g.float())
    y64.backward(g)
    for i, (p, r) in enumerate(zip(a32, a64)):
        torch.testing.assert_close(p.grad.double(), r.grad, **TOL, msg=lambda m: f"grad {i}: {m}")


def test_rms_norm_odd_shape():
    from kiln.kernels.rms_norm_triton import rms_norm_triton
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 123, 123, generator=g) * 3
    w = torch.randn(123, generator=g)
    _compare(lambda a, b: rms_norm_triton(a, b, 1e-6), lambda a, b: rms_norm_ref(a, b, 1e-6), [x, w])


def test_rms_norm_strided_rows_and_large_eps():
    from kiln.kernels.rms_norm_triton import rms_norm_triton
    g = torch.Generator().manual_seed(2)
    base = torch.randn(7, 3, 80, generator=g)
    w = torch.rand(40, generator=g) + 0.5
    # a last-dim slice: rows are not contiguous, the kernel must follow the row stride
    _compare(lambda a, b: rms_norm_triton(a[..., 20:60], b, 0.5),
             lambda a, b: rms_norm_ref(a[..., 20:60], b, 0.5), [base, w])


def test_swiglu_odd_shape():
    from kiln.kernels.swiglu_triton import swiglu_triton
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(5, 123, 123, generator=g) * 4  # wide range: both sigmoid tails
    up = torch.randn(5, 123, 123, generator=g)
    _compare(swiglu_triton, swiglu_ref, [gate, up])


def test_swiglu_shape_mismatch_is_an_error():
    from kiln.kernels.swiglu_triton import swiglu_triton
    with pytest.raises(ValueError, match="one shape"):
        swiglu_triton(torch.zeros(3, 4), torch.zeros(3, 5))


@pytest.mark.parametrize("b,s,h,d,batch_tables", [(2, 37, 5, 24, True), (3, 19, 7, 10, False)])
def test_rope(b, s, h, d, batch_tables):
    from kiln.kernels.rope_triton import apply_rope_triton
    g = torch.Generator().manual_seed(4)
    pos = torch.randint(0, 500, (b if batch_tables else 1, s), generator=g)
    cos, sin = rope_cos_sin(pos, d, 10000.0, dtype=torch.float64)  # [B|1, S, D/2]
    x = torch.randn(b, s, h, d, generator=g)
    _compare(lambda t: apply_rope_triton(t, cos.float(), sin.float()),
             lambda t: rope_ref(t, cos, sin), [x])


def test_rope_non_contiguous_input():
    from kiln.kernels.rope_triton import apply_rope_triton
    g = torch.Generator().manual_seed(5)
    cos, sin = rope_cos_sin(torch.arange(11)[None].expand(2, 11), 8, 500.0, dtype=torch.float64)
    fused = torch.randn(2, 11, 3 * 4 * 8, generator=g)  # like one fused qkv projection
    _compare(lambda t: apply_rope_triton(t.view(2, 11, 12, 8)[:, :, 4:8], cos.float(), sin.float()),
             lambda t: rope_ref(t.view(2, 11, 12, 8)[:, :, 4:8], cos, sin), [fused])
