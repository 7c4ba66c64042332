"""Block-sparse document masks: the Triton flash kernels skip (query tile, key tile) pairs that
share no document, and the torch path's FlexAttention block mask; both against the dense-mask
reference (attention_ref builds the [B, 1, S, S] mask), with the tiles skipped counted on a
packed batch of documents of mixed lengths (what concat-and-chunk gives a decomposition run's
baseline) and checked against a brute-force count over the dense mask."""
import pytest
import torch

from kiln.kernels.reference import attention_ref

# fp32 kernels vs the fp64 reference: sums over <= 128 keys agree to a few 1e-6
TOL = dict(atol=1e-4, rtol=1e-4)
LENGTHS = [[7, 30, 3, 52, 36], [90, 1, 17, 20]]  # two rows of 128 tokens, documents of mixed length


def _batch(hq=2, hkv=1, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(LENGTHS[0])
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in LENGTHS])
    q = torch.randn(2, S, hq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, S, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, S, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, doc


def _brute_force(doc, causal, bm, bn):
    """Tile pairs in the kernel's loop range, and those whose dense document mask is all False."""
    B, S = doc.shape
    same = doc[:, :, None] == doc[:, None, :]
    tiles = skipped = 0
    for b in range(B):
        for m0 in range(0, S, bm):
            end = min(S, m0 + bm) if causal else S
            for n0 in range(0, end, bn):
                tiles += 1
                skipped += not bool(same[b, m0:m0 + bm, n0:n0 + bn].any())
    return tiles, skipped


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("causal", [True, False])
def test_triton_skips_cross_document_tiles_and_matches_dense_mask(causal):
    from kiln.kernels.flash_attention import _blocks, attention_triton, tile_counts

    q, k, v, doc = _batch()
    bm, bn, _ = _blocks(q.shape[-1], torch.float32, q.device)
    counts = tile_counts(doc, doc, causal=causal, block_m=bm, block_n=bn)
    tiles, skipped = _brute_force(doc, causal, bm, bn)
    assert (counts["tiles"], counts["skipped"]) == (tiles, skipped)
    assert counts["skipped"] >= counts["tiles"] // 4  # most of a packed batch is cross-document
    print(f"\ntiles {bm}x{bn}, causal={causal}: {counts['tiles']} looped, {counts['skipped']} skipped")

    want = attention_ref(q, k, v, causal=causal, scale=0.3, doc_ids=doc)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gw = torch.autograd.grad(want, (q, k, v), dout)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    got = attention_triton(qf, kf, vf, causal=causal, scale=0.3, doc_ids=doc)
    torch.testing.assert_close(got.double(), want.detach(), **TOL)
    gg = torch.autograd.grad(got, (qf, kf, vf), dout.float())
    for name, a, e in zip("qkv", gg, gw):
        torch.testing.assert_close(a.double(), e, **TOL, msg=lambda m: f"d{name}: {m}")


def test_tile_counts_on_unsorted_ids_stay_conservative():
    """Ids that do not grow along the row (not packing's, but allowed): a tile is skipped only
    when its id ranges are disjoint, never when some query shares a document with a key."""
    from kiln.kernels.flash_attention import tile_counts

    g = torch.Generator().manual_seed(3)
    doc = torch.randint(0, 6, (3, 64), generator=g)
    c = tile_counts(doc, doc, causal=False, block_m=16, block_n=16)
    tiles, must_visit_skipped = _brute_force(doc, False, 16, 16)
    assert c["tiles"] == tiles and c["skipped"] <= must_visit_skipped


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [True, False])
def test_flex_block_mask_matches_dense_mask(causal):
    """The torch path's FlexAttention (eager here: on CPU kiln keeps SDPA's dense mask, see
    docs/kernels.md): outputs equal the dense-mask reference (fp64; torch 2.13 has no flex
    backward on CPU, so gradients are checked on CUDA only), and its block mask keeps exactly
    the blocks that tile_counts visits."""
    from kiln.kernels.flex import attention_flex, doc_block_mask, flex_available
    from kiln.kernels.flash_attention import tile_counts

    if not flex_available():
        pytest.fail("this torch has no torch.nn.attention.flex_attention")
    q, k, v, doc = (t.detach() for t in _batch(hq=4, hkv=2))  # torch 2.13: no flex backward on CPU
    want = attention_ref(q, k, v, causal=causal, scale=0.3, doc_ids=doc)
    got = attention_flex(q, k, v, causal=causal, scale=0.3, doc_ids=doc, compiled=False)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    block = 32
    bm = doc_block_mask(doc, causal=causal, block=block)
    kept = int(bm.kv_num_blocks.sum() + (bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0))
    c = tile_counts(doc, doc, causal=causal, block_m=block, block_n=block)
    assert kept == c["visited"] < c["tiles"]
