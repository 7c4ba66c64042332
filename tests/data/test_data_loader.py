"""ChunkLoader against a brute-force reference built from the raw token list."""

import numpy as np
import pytest
import torch

from kiln.data import DataConfig, DataError
from kiln.data.indexed import IndexWriter, megatron_indexed, open_indexed
from kiln.data.loader import IGNORE_INDEX, ChunkLoader, build_loader

SEQ = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(prefix, documents) of 60 random documents of 1..30 tokens, each ending with EOT=0."""
    rng = np.random.default_rng(7)
    docs = [np.append(rng.integers(3, 500, rng.integers(0, 30)), 0).astype(np.uint16)
            for _ in range(60)]
    prefix = tmp_path_factory.mktemp("idx") / "train"
    w = IndexWriter(prefix, np.uint16)
    for d in docs:
        w.add(d)
    w.finalize()
    return str(prefix), docs


def reference_row(docs, sample: int, seq_len: int) -> dict[str, list[int]]:
    """The sample built the slow, obvious way from the concatenated token list."""
    flat, owner = [], []
    for k, d in enumerate(docs):
        flat += d.tolist()
        owner += [k] * len(d)
    s = sample * seq_len
    win, own = flat[s:s + seq_len + 1], owner[s:s + seq_len + 1]
    pos, ids, p, cur, seen = [], [], 0, None, -1
    for t in range(seq_len):
        if own[t] != cur:
            cur, p, seen = own[t], 0, seen + 1
        pos.append(p)
        ids.append(seen)
        p += 1
    labels = [win[t + 1] if own[t + 1] == own[t] else IGNORE_INDEX for t in range(seq_len)]
    return {"input_ids": win[:seq_len], "labels": labels, "position_ids": pos, "doc_ids": ids}


def test_rows_match_brute_force_reference(corpus):
    prefix, docs = corpus
    total = sum(len(d) for d in docs)
    for seq_len in (1, 3, SEQ, 33):
        loader = ChunkLoader(prefix, seq_len, micro_batch=4, dp_rank=0, dp_size=1, seed=3)
        assert loader.num_samples == (total - 1) // seq_len
        every = loader.windows(np.arange(loader.num_samples))
        for key, t in every.items():
            assert t.dtype == torch.int64 and t.shape == (loader.num_samples, seq_len)
        for s in range(loader.num_samples):
            ref = reference_row(docs, s, seq_len)
            for key in ref:
                assert every[key][s].tolist() == ref[key], (seq_len, s, key)


def test_document_boundaries_are_masked(corpus):
    prefix, docs = corpus
    b = ChunkLoader(prefix, SEQ, 16, 0, 1, seed=0).batch(0)
    inp, lab, doc = b["input_ids"], b["labels"], b["doc_ids"]
    # after every EOT input the label is masked (the next token starts another document) ...
    assert torch.all(lab[inp == 0] == IGNORE_INDEX)
    # ... and every masked label sits at a document's last token
    assert torch.all(inp[lab == IGNORE_INDEX] == 0)
    assert torch.all(doc[:, 0] == 0) and torch.all(doc.diff(dim=1) >= 0)


def test_deterministic_and_resumable(corpus):
    prefix, _ = corpus
    a = ChunkLoader(prefix, SEQ, 2, 0, 1, seed=11, grad_accum=2)
    seq = [a.batch(s, m) for s in range(40) for m in range(2)]  # crosses several epochs
    b = ChunkLoader(prefix, SEQ, 2, 0, 1, seed=11, grad_accum=2)  # a "resumed" run at step 25
    for s in range(25, 40):
        for m in range(2):
            got, want = b.batch(s, m), seq[2 * s + m]
            assert all(torch.equal(got[k], want[k]) for k in want)
    c = ChunkLoader(prefix, SEQ, 2, 0, 1, seed=12, grad_accum=2)
    assert not torch.equal(c.batch(0)["input_ids"], seq[0]["input_ids"])


def test_epochs_are_permutations(corpus):
    prefix, _ = corpus
    L = ChunkLoader(prefix, SEQ, 3, 0, 1, seed=5)
    n = L.num_samples
    stream = np.concatenate([L.global_samples(s) for s in range(3 * n // 3 + 2)])
    for e in range(2):
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # a fresh order every epoch
    assert L.epoch_of(0) == 0 and L.epoch_of(n // 3 + 1) == 1


def test_ranks_are_disjoint_and_cover_the_global_batch(corpus):
    prefix, _ = corpus
    dp, accum, mb = 3, 2, 2
    loaders = [ChunkLoader(prefix, SEQ, mb, r, dp, seed=9, grad_accum=accum) for r in range(dp)]
    for step in (0, 1, 7):
        glob = loaders[0].global_samples(step)
        parts = [L.local_samples(step, m) for L in loaders for m in range(accum)]
        assert np.array_equal(np.concatenate(parts), glob)
        assert len(set(glob.tolist())) == len(glob)  # no repeats inside one step (same epoch)
        ref = loaders[0].windows(glob)["input_ids"]
        rows = torch.cat([L.batch(step, m)["input_ids"] for L in loaders for m in range(accum)])
        assert torch.equal(rows, ref)
    assert loaders[0].tokens_per_step == dp * accum * mb * SEQ


def test_eval_batches_are_fixed_and_sharded(corpus):
    prefix, _ = corpus
    dp, mb = 2, 3
    loaders = [ChunkLoader(prefix, SEQ, mb, r, dp, seed=r) for r in range(dp)]  # seed irrelevant
    n = loaders[0].eval_batch_count(4)
    assert n == min(4, loaders[0].num_samples // (dp * mb)) == loaders[1].eval_batch_count(4)
    got = [[b["input_ids"] for b in L.eval_batches(4)] for L in loaders]
    again = [b["input_ids"] for b in loaders[0].eval_batches(4)]
    assert all(torch.equal(x, y) for x, y in zip(got[0], again)) and len(again) == n
    allrows = torch.cat([torch.cat(g) for g in got])
    assert len({tuple(r.tolist()) for r in allrows}) == len(allrows)  # disjoint shards
    ref = loaders[0].windows(np.arange(n * dp * mb))["input_ids"]
    assert sorted(map(tuple, allrows.tolist())) == sorted(map(tuple, ref.tolist()))


def test_megatron_multi_sequence_documents(tmp_path):
    """Files from Megatron's own tools (several sequences per document) load by document."""
    b = megatron_indexed().IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    docs = [[[5, 6], [7]], [[8, 9, 10]], [[11], [12], [13, 14]]]
    for doc in docs:
        for seq in doc:
            b.add_item(torch.tensor(seq))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))
    row = ChunkLoader(str(tmp_path / "m"), 8, 1, 0, 1, seed=0).windows(np.array([0]))
    assert row["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert row["doc_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert row["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert row["labels"][0].tolist() == [6, 7, -100, 9, 10, -100, 12, 13]


def test_kiln_reader_equals_megatrons(tmp_path, corpus):
    """kiln's numpy reader (open_indexed) against megatron.core's IndexedDataset, the oracle:
    the same tokens and document bounds, on kiln-written and Megatron-written files (empty
    documents included, which the loader skips)."""
    b = megatron_indexed().IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    rng = np.random.default_rng(0)
    for d in range(40):
        for _ in range(int(rng.integers(0, 4))):  # 0 sequences: an empty document
            b.add_item(torch.from_numpy(rng.integers(0, 60000, int(rng.integers(1, 30))).astype(np.int64)))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))
    for prefix in (corpus[0], str(tmp_path / "m")):
        ds = megatron_indexed().IndexedDataset(prefix, mmap=True)
        tokens, starts, ends = open_indexed(prefix)
        cum = np.concatenate([[0], np.cumsum(ds.sequence_lengths)])
        doc = np.asarray(ds.document_indices)
        ref_starts, ref_ends = cum[doc[:-1]], cum[doc[1:]]
        keep = ref_ends > ref_starts
        assert np.array_equal(starts, ref_starts[keep]) and np.array_equal(ends, ref_ends[keep])
        assert tokens.dtype == ds.index.dtype and len(tokens) == cum[-1]
        for i in range(len(ds)):
            assert np.array_equal(tokens[cum[i]:cum[i + 1]], ds[i])


def test_errors(corpus):
    prefix, docs = corpus
    total = sum(len(d) for d in docs)
    with pytest.raises(DataError, match="seq_len") as e:
        ChunkLoader(prefix, total, 1, 0, 1, seed=0)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="unusable"):
        ChunkLoader(prefix + "-missing", 4, 1, 0, 1, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        ChunkLoader(prefix, 4, 1, 2, 2, seed=0)
    L = ChunkLoader(prefix, 4, 1, 0, 1, seed=0, grad_accum=2)
    with pytest.raises(ValueError, match="micro"):
        L.batch(0, 2)


def test_build_loader_dispatches_on_packing(corpus):
    prefix, _ = corpus
    L = build_loader(DataConfig(seq_len=SEQ), prefix, micro_batch=2, dp_rank=0, dp_size=1, seed=0)
    assert isinstance(L, ChunkLoader) and L.seq_len == SEQ
