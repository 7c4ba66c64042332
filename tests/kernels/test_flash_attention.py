"""Flash attention Triton kernels (interpreter, fp32) against the fp64 torch block attention
(kernels/block_attention.py, itself tested against a naive softmax) and torch SDPA: causal and
not, GQA, document masks with empty rows, Sq != Sk, and the ring use with a global lse/delta."""
import pytest
import torch

from kiln.kernels import block_attention as ref
from kiln.kernels.reference import attention_ref

pytestmark = pytest.mark.usefixtures("interp")

# fp32 tiles vs fp64: outputs/lse agree to ~1e-6, gradients (sums over <= 45 keys and the
# query heads of a GQA group) to a few 1e-6.
TOL = dict(atol=1e-4, rtol=1e-4)


def _inputs(b, sq, sk, hq, hkv, d, docs, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    if not docs:
        return q, k, v, None, None
    # sorted ids as packing gives; query doc 9 exists in no key block -> rows that see nothing
    q_doc = torch.sort(torch.randint(0, 3, (b, sq), generator=g), 1).values
    q_doc[:, -3:] = 9
    k_doc = torch.sort(torch.randint(0, 3, (b, sk), generator=g), 1).values
    return q, k, v, q_doc, k_doc


CASES = [  # b, sq, sk, hq, hkv, d, causal, docs
    (2, 37, 37, 4, 2, 16, True, False),
    (2, 37, 37, 2, 2, 24, False, False),
    (1, 45, 45, 4, 1, 16, True, True),
    (2, 20, 33, 3, 3, 8, False, True),
    (1, 33, 20, 2, 1, 16, True, True),  # Sq > Sk causal: top-left aligned
]


@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal,docs", CASES)
def test_fwd_bwd_match_fp64_reference(b, sq, sk, hq, hkv, d, causal, docs):
    from kiln.kernels.flash_attention import attention_bwd, attention_fwd
    q, k, v, qd, kd = _inputs(b, sq, sk, hq, hkv, d, docs, seed=sq * sk + hq)
    kw = dict(causal=causal, scale=0.3, q_doc=qd, k_doc=kd)
    out, lse = attention_fwd(q.float(), k.float(), v.float(), **kw)
    out64, lse64 = ref.attention_fwd(q, k, v, **kw)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    torch.testing.assert_close(out.double(), out64, **TOL)
    empty = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), empty)
    if docs:
        assert empty.any() and (out64.transpose(1, 2)[empty] == 0).all()
    torch.testing.assert_close(lse.double()[~empty], lse64[~empty], **TOL)
    dout = torch.randn(out64.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = attention_bwd(dout.float(), q.float(), k.float(), v.float(), out, lse, **kw)
    want = ref.attention_bwd(dout, q, k, v, out64, lse64, **kw)
    for name, a, e in zip("qkv", got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, **TOL, msg=lambda m: f"d{name}: {m}")


def test_blockwise_with_global_lse_sums_to_full_gradient():
    """What ring attention does: per key block forward, merge lse, backward each block with the
    global lse/delta; the block gradients must add up to the full one."""
    from kiln.kernels.flash_attention import attention_bwd, attention_fwd
    q, k, v, qd, kd = _inputs(2, 24, 40, 4, 2, 16, True, seed=3)
    q, k, v = q.float(), k.float(), v.float()
    kw = dict(causal=False, scale=0.25)
    blocks = [slice(0, 17), slice(17, 40)]
    parts = [attention_fwd(q, k[:, s], v[:, s], q_doc=qd, k_doc=kd[:, s], **kw) for s in blocks]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    out = sum(p[0] * torch.exp(p[1] - safe).transpose(1, 2)[..., None] for p in parts)
    full_out, full_lse = ref.attention_fwd(q.double(), k.double(), v.double(), q_doc=qd, k_doc=kd, **kw)
    torch.testing.assert_close(out.double(), full_out, **TOL)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    delta = (dout * out).sum(-1).transpose(1, 2)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for s in blocks:
        # out=None: with delta given the output is not needed (ring callers pass None)
        a, b_, c = attention_bwd(dout, q, k[:, s], v[:, s], None, lse, q_doc=qd, k_doc=kd[:, s],
                                 delta=delta, **kw)
        dq += a
        dk[:, s] += b_
        dv[:, s] += c
    want = ref.attention_bwd(dout.double(), q.double(), k.double(), v.double(), full_out, full_lse,
                             q_doc=qd, k_doc=kd, **kw)
    for a, e in zip((dq, dk, dv), want):
        torch.testing.assert_close(a.double(), e, **TOL)


@pytest.mark.parametrize("causal,docs", [(True, False), (True, True), (False, False)])
def test_model_level_attention_matches_sdpa(causal, docs):
    from kiln.kernels.flash_attention import attention_triton
    q, k, v, _, _ = _inputs(2, 29, 29, 4, 2, 16, False, seed=11)
    doc_ids = torch.tensor([[0] * 10 + [1] * 19, [0] * 29]) if docs else None
    a = [t.float().requires_grad_() for t in (q, k, v)]
    r = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_triton(*a, causal=causal, doc_ids=doc_ids)
    out64 = attention_ref(*r, causal=causal, doc_ids=doc_ids)
    torch.testing.assert_close(out.double(), out64, **TOL)
    g = torch.randn(out64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out.backward(g.float())
    out64.backward(g)
    for x, y in zip(a, r):
        assert x.grad.dtype == torch.float32
        torch.testing.assert_close(x.grad.double(), y.grad, **TOL)
