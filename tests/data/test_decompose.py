"""Dataset decomposition: chunk properties against the raw documents, the random split of long
documents (chi-square), the summary, and the prepare integration (cache, atomic, Megatron-readable)."""

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.data.decompose import (NO_LABEL, Decomposed, bucket_dir, bucket_prefix, decompose,
                                 decompose_split, long_doc_probs, split_document)
from kiln.data.errors import DataError
from kiln.data.indexed import IndexWriter, read_documents
from kiln.data.prepare import prepare
from tests.data.chisq import chisq_pvalue

LO, HI = 3, 7  # buckets 8 .. 128 tokens


def _write_docs(prefix, lengths):
    """Documents whose tokens are 0, 1, 2, ... (every token unique), int32."""
    w = IndexWriter(prefix, np.int32)
    w.add_many(np.arange(sum(lengths), dtype=np.int32), np.asarray(lengths, np.int64))
    w.finalize()
    w.close()
    return np.cumsum([0] + list(lengths))


def _lengths(seed=0):
    rng = np.random.default_rng(seed)
    short = rng.integers(1, 300, 300).tolist()  # below 2^(HI+1) = 256 mostly: the binary rule
    long = rng.integers(256, 3000, 60).tolist()  # random picks, then the binary rule
    return short + long + [1, 7, 8, 255, 256, 257]


def _read_buckets(out, split):
    chunks = {}
    for k in range(LO, HI + 1):
        tokens, starts, ends = read_documents(bucket_prefix(out, split, k))
        nxt = np.load(bucket_prefix(out, split, k) + ".next.npy")
        chunks[k] = [(np.asarray(tokens[a:b]), int(n)) for a, b, n in zip(starts, ends, nxt)]
    return chunks


def test_chunks_partition_the_kept_tokens(tmp_path):
    lengths = _lengths()
    bounds = _write_docs(tmp_path / "train", lengths)
    out = tmp_path / "out"
    out.mkdir()
    s = decompose_split(tmp_path / "train", out, "train", LO, HI, np.random.default_rng(0), flush_tokens=64)
    chunks = _read_buckets(out, "train")
    kept = []
    for k, items in chunks.items():
        for toks, nxt in items:
            assert len(toks) == 1 << k  # a power of two within the bucket range
            assert np.all(np.diff(toks) == 1)  # contiguous ...
            doc = np.searchsorted(bounds, toks[0], side="right") - 1
            assert toks[-1] < bounds[doc + 1]  # ... and inside one document
            end = bounds[doc + 1]
            assert nxt == (toks[-1] + 1 if toks[-1] + 1 < end else NO_LABEL)  # the last label
            kept.append(toks)
    kept = np.concatenate(kept)
    assert len(np.unique(kept)) == len(kept)  # every kept token exactly once
    total = int(bounds[-1])
    assert s["dropped_tokens"] == total - len(kept) and s["tokens"] == total
    # what is dropped is each document's tail, shorter than the smallest bucket
    dropped = np.setdiff1d(np.arange(total), kept)
    for a, b in zip(bounds[:-1], bounds[1:]):
        d = dropped[(dropped >= a) & (dropped < b)]
        assert len(d) < 1 << LO and (len(d) == 0 or (d[0] == b - len(d) and np.all(np.diff(d) == 1)))
    assert s["dropped_documents"] == sum(n < 1 << LO for n in lengths)
    for b in s["buckets"]:
        assert b["chunks"] == len(chunks[b["log2"]]) and b["tokens"] == b["chunks"] << b["log2"]
        assert b["documents"] <= b["chunks"]


def test_short_documents_follow_their_binary_representation():
    rng = np.random.default_rng(0)
    for n in range(0, 1 << (HI + 1)):
        want = [k for k in range(HI, LO - 1, -1) if n >> k & 1]
        assert split_document(n, LO, HI, rng) == want, n


def _long_picks(rule, seed=1, docs=400):
    """The sizes drawn while more than 2^(HI+1) tokens of a 2^12-token document are left."""
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(docs):
        left = 1 << 12
        for k in split_document(left, LO, HI, rng, rule):
            if left >= 1 << (HI + 1):
                picks.append(k)
            left -= 1 << k
    return np.bincount(picks, minlength=HI + 1)[LO:]


def test_long_documents_default_to_equal_tokens_per_bucket():
    """The default (the authors' rule): p(k) proportional to 2^(HI-k) (chi-square), so each
    bucket receives the same expected number of tokens from the random picks."""
    counts = _long_picks("equal_tokens")
    p = np.exp2(HI - np.arange(LO, HI + 1))
    p /= p.sum()
    assert chisq_pvalue(counts, counts.sum() * p) > 1e-3, counts
    assert np.all(counts > 0)  # the picks reach every bucket, the point of drawing them
    assert long_doc_probs(LO, HI) == pytest.approx(p, rel=1e-15)
    assert split_document(5000, LO, HI, np.random.default_rng(3)) == \
        split_document(5000, LO, HI, np.random.default_rng(3), "equal_tokens")
    tokens = counts * np.exp2(np.arange(LO, HI + 1))  # equal in expectation: within 15% here
    assert np.all(np.abs(tokens / tokens.mean() - 1) < 0.15), tokens


def test_long_documents_uniform_rule_draws_sizes_uniformly():
    """data.long_doc_rule=uniform: each size is a uniform draw over the buckets (chi-square)."""
    counts = _long_picks("uniform")
    n = len(counts)
    assert chisq_pvalue(counts, np.full(n, counts.sum() / n)) > 1e-3, counts
    assert np.all(counts > 0)
    with pytest.raises(ValueError, match="long_doc_rule"):
        split_document(5000, LO, HI, np.random.default_rng(0), "bogus")


def test_uniform_rule_keeps_its_draws_and_folder():
    """uniform draws exactly what kiln drew before the rule existed (integers over the range),
    and keeps the folder name, so caches built then stay valid; equal_tokens has its own."""
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    got = split_document(1 << 11, LO, HI, rng_a, "uniform")
    left, want = 1 << 11, []
    while left >= 1 << LO:
        k = left.bit_length() - 1
        k = int(rng_b.integers(LO, HI + 1)) if k > HI else k
        want.append(k)
        left -= 1 << k
    assert got == want
    assert bucket_dir("p", (LO, HI), 0, "uniform").name == "decompose-b03-07-s0"
    assert bucket_dir("p", (LO, HI), 0).name == "decompose-b03-07-s0-eq"


def test_random_split_is_seeded():
    a = [split_document(5000, LO, HI, np.random.default_rng([5, 0])) for _ in range(3)]
    b = [split_document(5000, LO, HI, np.random.default_rng([5, 0])) for _ in range(3)]
    assert a == b


@pytest.fixture
def decompose_cfg(small_cfg):
    small_cfg.packing = "decompose"
    small_cfg.buckets = [2, 5]
    return small_cfg


def test_prepare_decomposes_and_reuses(decompose_cfg, capsys):
    p = prepare(decompose_cfg, progress=True)
    err = capsys.readouterr().err
    assert "decomposed into buckets 2^2..2^5" in err and "dropped" in err
    d = Decomposed.load(next(Path(p.dir).glob("decompose-*")))
    assert (d.min_log2, d.max_log2) == (2, 5)
    summary = json.loads((Path(d.dir) / "summary.json").read_text())
    for split, docs, tokens in (("train", p.train_docs, p.train_tokens), ("valid", p.valid_docs, p.valid_tokens)):
        s = summary["splits"][split]
        assert s["documents"] == docs and s["tokens"] == tokens
        assert sum(b["tokens"] for b in s["buckets"]) + s["dropped_tokens"] == tokens
    assert (Path(d.dir) / "summary.txt").read_text().startswith("split")
    # Megatron reads every bucket file as an indexed dataset of equal-length sequences
    from kiln.data.indexed import megatron_indexed

    for k in d.buckets:
        n = d.chunks("train")[k]
        if n:
            ds = megatron_indexed().IndexedDataset(d.prefix("train", k), mmap=True)
            assert len(ds) == n and set(ds.sequence_lengths.tolist()) == {1 << k}
    mtimes = {f: f.stat().st_mtime_ns for f in Path(d.dir).iterdir()}
    prepare(decompose_cfg, progress=True)
    assert "reusing" in capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in Path(d.dir).iterdir()} == mtimes


def test_corrupt_decomposition_is_rebuilt(decompose_cfg, tmp_path):
    p = prepare(decompose_cfg, progress=False)
    d = Decomposed.load(next(Path(p.dir).glob("decompose-*")))
    victim = Path(d.prefix("train", 3) + ".bin")
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(DataError, match="wrong size"):
        Decomposed.load(d.dir)
    with pytest.raises(DataError, match="wrong size"):  # what `kiln train` does: refuse
        prepare(decompose_cfg, progress=False, repair=False)
    assert Path(p.train_prefix + ".bin").is_file()  # the tokenised folder is left alone
    again = decompose(p, [2, 5], 0, progress=False)  # what `kiln prepare` does: rebuild
    assert not again.reused and again.summary == d.summary


def test_a_failed_build_leaves_nothing(decompose_cfg, monkeypatch):
    p = prepare(decompose_cfg.__class__(**{**decompose_cfg.__dict__, "packing": "concat"}), progress=False)
    import kiln.data.decompose as dec

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dec, "summary_table", boom)
    with pytest.raises(RuntimeError):
        decompose(p, [2, 5], 0, progress=False)
    assert not [q for q in Path(p.dir).iterdir() if "decompose" in q.name]
