"""The eager torch path (kiln.kernels.eager) against the plain references, forward and grads."""
import pytest
import torch

from kiln.kernels import dispatch
from kiln.kernels.eager import attention_eager, rms_norm_eager, rope_eager
from kiln.kernels.reference import attention_ref, rms_norm_ref, rope_cos_sin, rope_ref


def _grads(fn, inputs, g):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _same(fn, ref, inputs, dtype, tol):
    """fn in `dtype` vs ref in fp64: output and every input gradient."""
    g = torch.randn(ref(*[t.double() for t in inputs]).shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)
    out, grads = _grads(fn, [t.to(dtype) for t in inputs], g)
    want, wgrads = _grads(ref, [t.double() for t in inputs], g)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    for i, (a, b) in enumerate(zip(grads, wgrads)):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("heads,kv", [(4, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_attention_matches_reference(heads, kv, causal, dtype, tol):
    gen = torch.Generator().manual_seed(heads * 10 + kv)
    q, k, v = (torch.randn(2, 33, h, 16, generator=gen) for h in (heads, kv, kv))
    _same(lambda a, b, c: attention_eager(a, b, c, causal=causal),
          lambda a, b, c: attention_ref(a, b, c, causal=causal), [q, k, v], dtype, tol)


DOCS = {  # every row split / none split (no mask needed) / a mix
    "all_split": [[0] * 7 + [1] * 13, [0] * 12 + [1] * 8, [0] * 3 + [1] * 3 + [2] * 14],
    "none_split": [[0] * 20, [3] * 20, [1] * 20],
    "mixed": [[0] * 20, [0] * 12 + [1] * 8, [2] * 5 + [1] * 10 + [2] * 5],  # last: a, b, a again
}


@pytest.mark.parametrize("docs", list(DOCS))
@pytest.mark.parametrize("heads,kv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_attention_with_documents_matches_reference(docs, heads, kv, causal, dtype, tol):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 20, h, 8, generator=gen) for h in (heads, kv, kv))
    doc = torch.tensor(DOCS[docs])
    _same(lambda a, b, c: attention_eager(a, b, c, causal=causal, doc_ids=doc),
          lambda a, b, c: attention_ref(a, b, c, causal=causal, doc_ids=doc), [q, k, v], dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rms_norm_matches_reference(dtype, tol):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 40, generator=gen) * 3
    w = torch.randn(40, generator=gen)
    _same(lambda a, b: rms_norm_eager(a, b, 1e-5), lambda a, b: rms_norm_ref(a, b, 1e-5), [x, w], dtype, tol)


def test_rms_norm_half_input_computes_in_fp32():
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 64, generator=gen) * 5).bfloat16()
    w = torch.randn(64, generator=gen).bfloat16()
    got, want = rms_norm_eager(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    # both compute in fp32 and round once: at most one bf16 ulp apart (2^-7 relative)
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2 ** -7)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rope_matches_reference(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 9, 5, 16, generator=gen)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 0, 1, 2, 9, 10, 11]])
    cos, sin = rope_cos_sin(pos, 16, 10000.0, torch.float64)
    # a non-contiguous slice of heads, as the fused QKV projection hands it over
    _same(lambda t: rope_eager(t[:, :, 1:4], cos.to(t.dtype), sin.to(t.dtype)),
          lambda t: rope_ref(t[:, :, 1:4], cos, sin), [base], dtype, tol)


def test_cpu_dispatch_takes_the_eager_path():
    assert dispatch.get("attention", torch.device("cpu")) is attention_eager
    assert dispatch.get("rms_norm", torch.device("cpu")) is rms_norm_eager
    assert dispatch.get("rope", torch.device("cpu")) is rope_eager
