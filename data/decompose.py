"""Dataset decomposition (METHODS.md §5): documents -> power-of-two chunks, one dataset per bucket.

Each tokenised document (EOT included) is cut, from its start, into chunks whose lengths follow
the binary representation of what is left: take k = floor(log2(left)); when k exceeds the
largest bucket, take a size 2^k' with k' drawn uniformly from the allowed buckets instead (so
long documents feed every bucket, not only the largest); stop when fewer than 2^min tokens are
left and drop them (counted). A chunk never spans two documents.

Layout, inside a prepared folder (see kiln.data.prepare):
  decompose-b<min>-<max>-s<seed>/
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


def split_document(length: int, min_log2: int, max_log2: int, rng: np.random.Generator) -> list[int]:
    """log2 sizes of the chunks of a `length`-token document, in order from its start.

    The tokens after the last chunk (length - sum of 2^k, always < 2^min_log2) are dropped.
    """
    out, left = [], int(length)
    while left >= 1 << min_log2:
        k = left.bit_length() - 1
        if k > max_log2:
            k = int(rng.integers(min_log2, max_log2 + 1))
        out.append(k)
        left -= 1 << k
    return out


def bucket_dir(prepared_dir: str | os.PathLike, buckets, seed: int) -> Path:
    """Where the decomposition of a prepared folder for these buckets and seed lives."""
    lo, hi = buckets
    return Path(prepared_dir) / f"decompose-b{lo:02d}-{hi:02d}-s{seed}"


def bucket_prefix(dir: str | os.PathLike, split: str, k: int) -> str:
    """Path prefix of the indexed dataset of bucket 2^k of `split`."""
    return str(Path(dir) / f"{split}_b{k:02d}")


def decompose_split(prefix, out_dir: Path, split: str, min_log2: int, max_log2: int,
                    rng: np.random.Generator, flush_tokens: int = 1 << 22) -> dict:
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
            sizes = split_document(end - start, min_log2, max_log2, rng)
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
              repair: bool = True) -> Decomposed:
    """Decompose a Prepared folder's splits into buckets 2^buckets[0] .. 2^buckets[1] (cached).

    Idempotent: an existing folder that passes `Decomposed.load` is reused; a missing one is
    built under a temporary name and renamed into place. An existing folder that fails
    validation is rebuilt when `repair` (`kiln prepare`), else its DataError is raised (a
    training run never silently replaces files, as for the prepared folder itself).
    """
    lo, hi = buckets
    final = bucket_dir(prepared.dir, buckets, seed)
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
        summary = {"min_log2": lo, "max_log2": hi, "seed": seed, "splits": {}}
        for i, (split, prefix) in enumerate(zip(SPLITS, (prepared.train_prefix, prepared.valid_prefix))):
            # one stream per split, so adding held-out documents never changes the training chunks
            rng = np.random.default_rng([seed, i])
            summary["splits"][split] = decompose_split(prefix, tmp, split, lo, hi, rng)
        write_atomic(tmp / "summary.json", json.dumps(summary, indent=1).encode())
        write_atomic(tmp / "summary.txt", (summary_table(summary) + "\n").encode())
        fields = {"format": FORMAT, "min_log2": lo, "max_log2": hi, "seed": seed}
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
