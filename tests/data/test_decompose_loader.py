"""DecomposeLoader: rows against the chunks, one bucket per step on every rank, disjoint shares
(data- and sequence-parallel steps), constant tokens per step, exact resume, layout errors."""

import numpy as np
import pytest

from kiln.data.decompose_loader import DecomposeLoader, check_layout
from kiln.data.decompose import bucket_prefix, decompose_split
from tests.data.test_decompose import _write_docs

LO, HI = 2, 5  # 4 .. 32 tokens
T = 256        # tokens per step


@pytest.fixture(scope="module")
def buckets(tmp_path_factory):
    d = tmp_path_factory.mktemp("buckets")
    rng = np.random.default_rng(0)
    _write_docs(d / "train", rng.integers(1, 200, 400).tolist())
    decompose_split(d / "train", d, "train", LO, HI, np.random.default_rng(0))
    return {k: bucket_prefix(d, "train", k) for k in range(LO, HI + 1)}


def _loaders(buckets, world, sp=1, sp_min_len=0, accum=1, seed=3):
    return [DecomposeLoader(buckets, T, r, world, sp=sp, sp_min_len=sp_min_len, seed=seed,
                            grad_accum=accum, weights=[8, 4, 2, 1], num_cycles=2)
            for r in range(world)]


def test_rows_are_chunks_with_next_token_labels(buckets):
    ld = _loaders(buckets, 1)[0]
    for step in range(5):
        p = ld.plan(step)
        b = ld.batch(step)
        ids = np.sort(ld.local_chunks(step))
        assert b["input_ids"].shape == (T // p.seq_len, p.seq_len) == (p.rows, p.seq_len)
        tok = ld._tokens[p.bucket]
        for row, c in enumerate(ids):
            assert b["input_ids"][row].tolist() == tok[c].tolist()
            assert b["labels"][row, :-1].tolist() == tok[c][1:].tolist()
            assert b["labels"][row, -1].item() == ld._next[p.bucket][c]
            assert b["position_ids"][row].tolist() == list(range(p.seq_len))
        assert "doc_ids" not in b  # one document per row: no mask


@pytest.mark.parametrize("world,sp,sp_min_len,accum", [(4, 1, 0, 1), (4, 2, 16, 1), (2, 2, 0, 2)])
def test_same_bucket_disjoint_shares_constant_tokens(buckets, world, sp, sp_min_len, accum):
    lds = _loaders(buckets, world, sp, sp_min_len, accum)
    for step in range(0, 2 * lds[0].steps_per_epoch, 3):
        plans = [ld.plan(step) for ld in lds]
        assert len(set(plans)) == 1  # every rank draws the same bucket and layout
        p = plans[0]
        assert p.sp == (sp > 1 and p.seq_len >= sp_min_len)
        tokens_held = 0
        shares = {}
        for r, ld in enumerate(lds):
            for m in range(accum):
                rows = ld.local_chunks(step, m)
                key = (r // sp if p.sp else r, m)
                if key in shares:  # the other ranks of a sequence group: the same rows
                    assert rows.tolist() == shares[key].tolist()
                shares[key] = rows
                # per rank and micro-step: tokens_per_step / (world * accum), after SP sharding
                held = len(rows) * p.seq_len // (sp if p.sp else 1)
                assert held == T // (world * accum)
                tokens_held += held
        assert tokens_held == T  # constant tokens per step
        got = np.concatenate(list(shares.values()))
        assert sorted(got.tolist()) == sorted(lds[0].global_chunks(step).tolist())
        assert len(set(got.tolist())) == len(got)  # disjoint


def test_each_epoch_uses_a_chunk_at_most_once(buckets):
    ld = _loaders(buckets, 1)[0]
    for e in range(2):
        used = {k: [] for k in range(LO, HI + 1)}
        for s in range(e * ld.steps_per_epoch, (e + 1) * ld.steps_per_epoch):
            used[ld.plan(s).bucket] += ld.global_chunks(s).tolist()
        for b, k in enumerate(range(LO, HI + 1)):
            assert len(set(used[k])) == len(used[k])
            assert len(ld._tokens[k]) - len(used[k]) < T >> k  # only a partial batch is left over


def test_resume_is_exact(buckets):
    run = _loaders(buckets, 2, accum=2)
    seen = [[ld.batch(s, m)["input_ids"] for ld in run for m in range(2)] for s in range(12)]
    fresh = _loaders(buckets, 2, accum=2)  # a resumed run: new loaders, asked from step 7 on
    for s in range(7, 12):
        again = [ld.batch(s, m)["input_ids"] for ld in fresh for m in range(2)]
        assert all((a == b).all() for a, b in zip(again, seen[s]))


def test_layout_errors_name_the_fix():
    check_layout(16384, (8, 13), world=2)  # one 8k row per rank
    with pytest.raises(ValueError, match="multiple of 16384"):
        check_layout(8192, (8, 13), world=2)
    check_layout(16384, (8, 13), world=4, sp=2)  # every bucket on the 2 sequence groups
    # sp_min_len=1024: 2^10 on 2 groups and 2^9 on 4 ranks both need 2048 tokens
    check_layout(2048, (8, 10), world=4, sp=2, sp_min_len=1024)
    with pytest.raises(ValueError, match="multiple of 2048"):
        check_layout(1024, (8, 10), world=4, sp=2, sp_min_len=1024)
    with pytest.raises(ValueError, match="4 micro-steps: make it a multiple of 8192"):
        check_layout(2048, (8, 10), world=2, grad_accum=4)
    with pytest.raises(ValueError, match="zigzag"):
        check_layout(8192, (2, 5), world=8, sp=8)


def test_heldout_covers_every_bucket_with_disjoint_rows_and_token_weights(buckets):
    """DecomposeHeldOut: per bucket, the ranks' rows are disjoint chunks of one micro-step (shared
    by the ranks of a sequence-parallel group), the same on every call; batch_losses' weighted
    mean is the token-weighted mean of the per-bucket means, and per_tag holds those means."""
    import torch

    from kiln.data.decompose_loader import DecomposeHeldOut
    from kiln.infer.evaluate import batch_losses

    world, n = 4, 3
    for sp, sp_min_len in ((1, 0), (2, 16)):
        held = [DecomposeHeldOut(buckets, T, r, world, sp=sp, sp_min_len=sp_min_len) for r in range(world)]
        per_rank = [list(h.eval_batches(n)) for h in held]
        assert [b["input_ids"].tolist() for b in held[0].eval_batches(n)] == \
            [b["input_ids"].tolist() for b in per_rank[0]]
        for k in range(LO, HI + 1):
            count = held[0].eval_batch_count(n, k)
            assert count == min(n, held[0].chunks[k] // (T >> k)) > 0
            mine = [[b for b in bs if b.tag == k] for bs in per_rank]
            assert all(len(m) == count for m in mine)
            on = sp > 1 and 1 << k >= sp_min_len
            for j in range(count):
                rows = [m[j]["input_ids"] for m in mine]
                assert all(len(r) == (T >> k) // (world // sp if on else world) for r in rows)
                groups = [rows[g * sp] for g in range(world // sp)] if on else rows
                if on:  # a group's ranks load the same rows
                    assert all(torch.equal(rows[r], rows[r // sp * sp]) for r in range(world))
                got = torch.cat(groups)
                assert got.shape == (T >> k, 1 << k)  # one micro-step of the bucket, all ranks
                assert len({tuple(x) for x in got.tolist()}) == len(got)  # disjoint chunks
                assert mine[0][j].weight == pytest.approx((held[0].chunks[k] << k) / count, rel=1e-15)
    # the weighted mean against a hand computation with a toy per-batch "loss"
    h = DecomposeHeldOut(buckets, T, 0, 1)
    batches = h.eval_batches(n)
    loss = lambda b: b["input_ids"].double().mean() / 1000  # noqa: E731
    total, count = batch_losses(loss, batches)
    tok = {k: h.chunks[k] << k for k in h.ks}
    means = {k: float(np.mean([float(loss(b)) for b in h.eval_batches(n) if b.tag == k])) for k in h.ks}
    assert total / count == pytest.approx(sum(tok[k] * means[k] for k in h.ks) / sum(tok.values()), rel=1e-12)
    assert {k: s / c for k, (s, c) in batches.per_tag.items()} == pytest.approx(means, rel=1e-12)
