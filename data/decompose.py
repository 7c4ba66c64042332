"""Dataset decomposition (METHODS.md §5): documents -> power-of-two chunks, one dataset per bucket.

Each tokenised document (EOT included) is cut, from its start, into chunks whose lengths follow
the binary representation of what is left: take k = floor(log2(left)); when k exceeds the
largest bucket, draw a size 2^k' from the allowed buckets instead (so long documents feed every
bucket, not only the largest); stop when fewer than 2^min tokens are left and drop them
(counted). A chunk never spans two documents.

The draw (data.long_doc_rule): `equal_tokens` (the default, the authors' public code) takes k'
with p(k') proportional to 2^(max - k'), so each draw puts the same expected number of tokens in
every bucket; `uniform` (kiln's earlier rule) takes k' uniformly, which puts tokens in proportion
to 2^k', most of them in the longest bucket.

Layout, inside a prepared folder (see kiln.data.prepare):
  decompose-b<min>-<max>-s<seed>[-eq]/          (-eq: long_doc_rule=equal_tokens)
    train_b08.bin/.idx ... train_b13.bin/.idx   one Megatron indexed dataset per bucket: one
    valid_b08.bin/.idx ...                        sequence (= chunk) of 2^k tokens per entry
    train_b08.next.npy ...                      per chunk, the document token after it (its
                                                last label), or -100 at the document's end
    summary.json, summary.txt                   documents, chunks, tokens per bucket, dropped
    manifest.json                               written last: sizes and sha256 of every file
Built under a temporary name and renamed into place, like the prepared folder itself; reused
when it exists and checks out, rebuilt when it does not only if `repair` (`kiln prepare`).
"""

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .indexed import IndexWriter, check_indexed, read_documents
from .manifest import publish, sha256_file
from .tokenizer import write_atomic

FORMAT = "kiln-decompose-v1"
SPLITS = ("train", "valid")
NO_LABEL = -100  # the loss's ignore index: nothing follows a document's EOT
LONG_DOC_RULES = ("equal_tokens", "uniform")  # how a long document's chunk sizes are drawn


def long_doc_probs(min_log2: int, max_log2: int, rule: str = "equal_tokens") -> np.ndarray:
    """p(k) of a long document's chunk size 2^k, k = min_log2 .. max_log2, under `rule`."""
    if rule not in LONG_DOC_RULES:
        raise ValueError(f"long_doc_rule={rule!r} is unknown: choose one of {list(LONG_DOC_RULES)}")
    ks = np.arange(min_log2, max_log2 + 1)
    w = np.ones(len(ks)) if rule == "uniform" else np.exp2(max_log2 - ks)
    return w / w.sum()


def split_document(length: int, min_log2: int, max_log2: int, rng: np.random.Generator,
                   rule: str = "equal_tokens") -> list[int]:
    """log2 sizes of the chunks of a `length`-token document, in order from its start.

    While the binary rule would take a chunk longer than 2^max_log2, the size is drawn by `rule`
    (see the module docstring). The tokens after the last chunk (length - sum of 2^k, always
    < 2^min_log2) are dropped.
    """
    probs = long_doc_probs(min_log2, max_log2, rule)
    out, left = [], int(length)
    while left >= 1 << min_log2:
        k = left.bit_length() - 1
        if k > max_log2:
            if rule == "uniform":  # kept draw for draw: old decompositions rebuild identically
                k = int(rng.integers(min_log2, max_log2 + 1))
            else:
                k = min_log2 + int(rng.choice(len(probs), p=probs))
        out.append(k)
        left -= 1 << k
    return out


def bucket_dir(prepared_dir: str | os.PathLike, buckets, seed: int, rule: str = "equal_tokens") -> Path:
    """Where the decomposition of a prepared folder for these buckets, seed and long-document
    rule lives (uniform keeps its earlier name, so its caches stay valid)."""
    lo, hi = buckets
    return Path(prepared_dir) / f"decompose-b{lo:02d}-{hi:02d}-s{seed}{'' if rule == 'uniform' else '-eq'}"


def bucket_prefix(dir: str | os.PathLike, split: str, k: int) -> str:
    """Path prefix of the indexed dataset of bucket 2^k of `split`."""
    return str(Path(dir) / f"{split}_b{k:02d}")


def decompose_split(prefix, out_dir: Path, split: str, min_log2: int, max_log2: int,
                    rng: np.random.Generator, flush_tokens: int = 1 << 22,
                    rule: str = "equal_tokens") -> dict:
    """Decompose one split's documents into per-bucket indexed datasets; returns its summary."""
    tokens, starts, ends = read_documents(prefix)
    ks = range(min_log2, max_log2 + 1)
    writers = {k: IndexWriter(bucket_prefix(out_dir, split, k), tokens.dtype) for k in ks}
    pending = {k: [] for k in ks}
    nexts = {k: [] for k in ks}
    docs = dict.fromkeys(ks, 0)
    dropped = dropped_docs = 0
    try:
        for start, end in zip(starts.tolist(), ends.tolist()):
            sizes = split_document(end - start, min_log2, max_log2, rng, rule)
            pos = start
            for k in sizes:
                stop = pos + (1 << k)
                pending[k].append((pos, stop))
                nexts[k].append(int(tokens[stop]) if stop < end else NO_LABEL)
                pos = stop
            for k in set(sizes):
                docs[k] += 1
            dropped += end - pos
            dropped_docs += not sizes
            for k in ks:  # write in slabs: memory stays bounded on big corpora
                if len(pending[k]) << k >= flush_tokens:
                    _flush(writers[k], tokens, pending[k], k)
        for k in ks:
            _flush(writers[k], tokens, pending[k], k)
            writers[k].finalize()
            np.save(bucket_prefix(out_dir, split, k) + ".next.npy", np.asarray(nexts[k], np.int32))
    finally:
        for w in writers.values():
            w.close()
    buckets = [{"log2": k, "length": 1 << k, "documents": docs[k], "chunks": writers[k].docs,
                "tokens": writers[k].tokens} for k in ks]
    return {"documents": len(starts), "tokens": int(ends[-1] - starts[0]) if len(starts) else 0,
            "buckets": buckets, "dropped_tokens": int(dropped), "dropped_documents": int(dropped_docs)}


def _flush(writer: IndexWriter, tokens, spans: list, k: int) -> None:
    if spans:
        flat = np.concatenate([tokens[a:b] for a, b in spans])
        writer.add_many(flat, np.full(len(spans), 1 << k, dtype=np.int64))
        spans.clear()


def summary_table(summary: dict) -> str:
    """The summary as an aligned text table (what `kiln prepare` prints)."""
    head = f"{'split':<6} {'bucket':>7} {'length':>7} {'documents':>10} {'chunks':>9} {'tokens':>12} {'share':>7}"
    lines = [head, "-" * len(head)]
    for split in SPLITS:
        s = summary["splits"][split]
        total = max(s["tokens"], 1)
        for b in s["buckets"]:
            lines.append(f"{split:<6} {'2^' + str(b['log2']):>7} {b['length']:>7,} {b['documents']:>10,} "
                         f"{b['chunks']:>9,} {b['tokens']:>12,} {100 * b['tokens'] / total:>6.1f}%")
        lines.append(f"{split:<6} {'dropped':>7} {'':>7} {s['dropped_documents']:>10,} {'':>9} "
                     f"{s['dropped_tokens']:>12,} {100 * s['dropped_tokens'] / total:>6.1f}%")
    return "\n".join(lines)


@dataclass
class Decomposed:
    """A finished decomposition: its folder, bucket range and per-split summary."""

    dir: str
    min_log2: int
    max_log2: int
    seed: int
    summary: dict = field(default_factory=dict)
    reused: bool = False

    @property
    def buckets(self) -> list[int]:
        """The bucket exponents k, shortest first."""
        return list(range(self.min_log2, self.max_log2 + 1))

    def prefix(self, split: str, k: int) -> str:
        """Path prefix of bucket 2^k of `split` (train or valid)."""
        return bucket_prefix(self.dir, split, k)

    def chunks(self, split: str) -> dict[int, int]:
        """Chunks per bucket exponent in `split`."""
        return {b["log2"]: b["chunks"] for b in self.summary["splits"][split]["buckets"]}

    @classmethod
    def load(cls, dir: str | os.PathLike, *, checksum: bool = True) -> "Decomposed":
        """Open a decomposition folder, checking every file against its manifest."""
        d = Path(dir)
        fix = f"delete {d} and run `kiln prepare` again"
        try:
            m = json.loads((d / "manifest.json").read_text())
            if m.get("format") != FORMAT:
                raise ValueError(f"format {m.get('format')!r}")
            lo, hi, seed, files = m["min_log2"], m["max_log2"], m["seed"], m["files"]
        except FileNotFoundError:
            raise DataError(f"decomposition {d} has no manifest.json: {fix}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"decomposition {d} has an unreadable manifest ({e}): {fix}") from None
        for name, meta in files.items():
            p = d / name
            if not p.is_file() or p.stat().st_size != meta["bytes"]:
                raise DataError(f"decomposition {d}: {name} is missing or has the wrong size: {fix}")
            if (checksum or name.endswith((".idx", ".json", ".npy"))) and sha256_file(p) != meta["sha256"]:
                raise DataError(f"decomposition {d}: {name} does not match its checksum: {fix}")
        for split in SPLITS:
            for k in range(lo, hi + 1):
                reason = check_indexed(bucket_prefix(d, split, k))
                if reason:
                    raise DataError(f"decomposition {d} is corrupt ({reason}): {fix}")
        summary = json.loads((d / "summary.json").read_text())
        return cls(dir=str(d), min_log2=lo, max_log2=hi, seed=seed, summary=summary)


def decompose(prepared, buckets, seed: int = 0, *, progress: bool = True,
              repair: bool = True, rule: str = "equal_tokens") -> Decomposed:
    """Decompose a Prepared folder's splits into buckets 2^buckets[0] .. 2^buckets[1] (cached).

    Idempotent: an existing folder that passes `Decomposed.load` is reused; a missing one is
    built under a temporary name and renamed into place. An existing folder that fails
    validation is rebuilt when `repair` (`kiln prepare`), else its DataError is raised (a
    training run never silently replaces files, as for the prepared folder itself).
    """
    lo, hi = buckets
    final = bucket_dir(prepared.dir, buckets, seed, rule)
    if final.exists():
        try:
            dec = Decomposed.load(final)
            dec.reused = True
            _show(progress, f"reusing {final}", dec.summary)
            return dec
        except DataError as e:
            if not repair:
                raise
            _show(progress, f"rebuilding: {e}", None)
            shutil.rmtree(final, ignore_errors=True)
    t0 = time.perf_counter()
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = {"min_log2": lo, "max_log2": hi, "seed": seed, "long_doc_rule": rule, "splits": {}}
        for i, (split, prefix) in enumerate(zip(SPLITS, (prepared.train_prefix, prepared.valid_prefix))):
            # one stream per split, so adding held-out documents never changes the training chunks
            rng = np.random.default_rng([seed, i])
            summary["splits"][split] = decompose_split(prefix, tmp, split, lo, hi, rng, rule=rule)
        write_atomic(tmp / "summary.json", json.dumps(summary, indent=1).encode())
        write_atomic(tmp / "summary.txt", (summary_table(summary) + "\n").encode())
        fields = {"format": FORMAT, "min_log2": lo, "max_log2": hi, "seed": seed, "long_doc_rule": rule}
        if not publish(tmp, final, fields):  # another process finished first: use theirs if sound
            return Decomposed.load(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _show(progress, f"decomposed into buckets 2^{lo}..2^{hi} in {time.perf_counter() - t0:.1f}s: "
                    f"{final}", summary)
    return Decomposed.load(final, checksum=False)


def _show(progress: bool, msg: str, summary: dict | None) -> None:
    if progress:
        print(f"[kiln prepare] {msg}", file=sys.stderr, flush=True)
        if summary is not None:
            print(summary_table(summary), file=sys.stderr, flush=True)
