"""Block attention (torch path) against a naive fp64 softmax(QK^T)V with explicit masks."""
import pytest
import torch

from kiln.kernels.block_attention import attention, attention_bwd, attention_fwd

TOL = 1e-12  # fp64 throughout; the tiled computation differs from the naive one only by rounding


def naive(q, k, v, causal, scale, q_doc=None, k_doc=None):
    """softmax(QK^T * scale) V with an explicit boolean mask; empty rows -> out 0, lse -inf."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    allowed = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool)
    if causal:
        allowed &= torch.ones(q.shape[1], k.shape[1]).tril().bool()
    if q_doc is not None:
        allowed &= q_doc[:, :, None] == k_doc[:, None, :]
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhij,bjhd->bihd", p, vv), lse


def make(b, sq, sk, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, dtype=torch.float64, generator=g)
    k = torch.randn(b, sk, hkv, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, sk, hkv, d, dtype=torch.float64, generator=g)
    return q, k, v


CASES = [  # b, sq, sk, hq, hkv, d, causal, docs
    (1, 7, 7, 2, 2, 5, True, False),
    (2, 13, 13, 6, 2, 12, True, False),
    (2, 9, 14, 4, 1, 3, False, False),
    (3, 11, 11, 4, 2, 8, True, True),
    (2, 10, 6, 3, 3, 4, False, True),
    (1, 12, 5, 2, 1, 7, True, False),  # Sq > Sk causal: rows >= Sk see every key
]


def docs_for(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (b, s), generator=g).cumsum(1) // 2  # runs of equal ids


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward_match_naive(case, chunk):
    b, sq, sk, hq, hkv, d, causal, docs = case
    q, k, v = make(b, sq, sk, hq, hkv, d)
    q_doc = docs_for(b, sq, 1) if docs else None
    k_doc = docs_for(b, sk, 2) if docs else None
    scale = 0.37
    out, lse = attention_fwd(q, k, v, causal=causal, scale=scale, q_doc=q_doc, k_doc=k_doc,
                             q_chunk=chunk)
    ref, ref_lse = naive(q, k, v, causal, scale, q_doc, k_doc)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert lse.shape == (b, hq, sq)
    assert (out - ref).abs().max() < TOL
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < TOL

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, _ = naive(qr, kr, vr, causal, scale, q_doc, k_doc)
    dout = torch.randn_like(ref_out)
    # rows with no visible key give NaN grads in the naive -inf softmax; mask them out of dout
    empty = torch.isneginf(ref_lse).transpose(1, 2)[..., None]
    dout = dout.masked_fill(empty, 0.0)
    ref_out.backward(dout)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, causal=causal, scale=scale,
                               q_doc=q_doc, k_doc=k_doc, q_chunk=chunk)
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert got.shape == want.shape
        assert (got - torch.nan_to_num(want)).abs().max() < TOL


def test_empty_rows_are_zero_not_nan():
    q, k, v = make(1, 4, 4, 2, 1, 3)
    q_doc = torch.tensor([[0, 0, 5, 5]])
    k_doc = torch.tensor([[0, 0, 1, 1]])  # queries of doc 5 see nothing
    out, lse = attention_fwd(q, k, v, causal=False, scale=1.0, q_doc=q_doc, k_doc=k_doc)
    assert torch.isneginf(lse[:, :, 2:]).all() and torch.isfinite(lse[:, :, :2]).all()
    assert not out.isnan().any() and (out[:, 2:] == 0).all()
    dq, dk, dv = attention_bwd(torch.ones_like(out), q, k, v, out, lse, causal=False, scale=1.0,
                               q_doc=q_doc, k_doc=k_doc)
    assert not (dq.isnan().any() or dk.isnan().any() or dv.isnan().any())
    assert (dq[:, 2:] == 0).all()


def test_global_lse_split_over_key_blocks_sums_to_full_gradient():
    """The ring contract: per-block bwd with the global lse/delta adds up to the full gradient."""
    q, k, v = make(2, 8, 12, 4, 2, 6, seed=3)
    dout = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    out, lse = attention_fwd(q, k, v, causal=False, scale=0.5)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, causal=False, scale=0.5)
    parts = [attention_bwd(dout, q, k[:, sl], v[:, sl], out, lse, causal=False, scale=0.5)
             for sl in (slice(0, 5), slice(5, 12))]
    assert (parts[0][0] + parts[1][0] - dq).abs().max() < TOL
    assert (torch.cat([parts[0][1], parts[1][1]], 1) - dk).abs().max() < TOL
    assert (torch.cat([parts[0][2], parts[1][2]], 1) - dv).abs().max() < TOL


def test_autograd_wrapper_and_dtypes():
    q, k, v = make(2, 6, 6, 4, 2, 8)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention(qr, kr, vr, causal=True)
    ref, _ = naive(q, k, v, True, 8 ** -0.5)
    assert (out - ref).abs().max() < TOL
    torch.autograd.gradcheck(lambda a, b_, c: attention(a, b_, c, causal=True),
                             (qr[:1, :3, :2, :3].detach().clone().requires_grad_(),
                              kr[:1, :3, :1, :3].detach().clone().requires_grad_(),
                              vr[:1, :3, :1, :3].detach().clone().requires_grad_()))
    out32, lse32 = attention_fwd(q.float(), k.float(), v.float(), causal=True, scale=0.3)
    assert out32.dtype == torch.float32 and lse32.dtype == torch.float32
    outbf, lsebf = attention_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, scale=0.3)
    assert outbf.dtype == torch.bfloat16 and lsebf.dtype == torch.float32


def test_errors():
    q, k, v = make(1, 4, 4, 3, 2, 4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_fwd(q, k, v, causal=True, scale=1.0)
    q, k, v = make(1, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match="head dim"):
        attention_fwd(q[..., :3], k, v, causal=True, scale=1.0)
    with pytest.raises(ValueError, match="both q_doc and k_doc"):
        attention_fwd(q, k, v, causal=True, scale=1.0, q_doc=torch.zeros(1, 4))
