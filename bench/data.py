"""`kiln prepare` throughput against raw `tokenizers` encoding of the same text.

    .venv/bin/python bench/data.py [--repeats 3] [--max-documents 0] [--vocab-size 4096]

Corpus: the embedded stdlib corpus. Prints
  - one cold prepare (BPE training + tokenising + writing), as a user's first run sees it;
  - prepare throughput (MB of UTF-8 text per second, tokenizer cached, everything else timed:
    reading and hashing the corpus, tokenising, writing and checksumming the files), per
    num_workers setting;
  - raw Tokenizer.encode_batch (and encode_batch_fast) on the same in-memory texts with the same
    tokenizer, and the ratios (goal: prepare / encode_batch >= 0.8).
Runs are interleaved; best and median of --repeats are shown, with CPU seconds (all threads
and worker processes) so that load from other jobs on the machine can be told apart.
"""

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from kiln.data import DataConfig, prepare
from kiln.data.sources import StdlibCorpus, split_documents
from kiln.data.tokenizer import train_tokenizer


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
    """(result, wall seconds, cpu seconds) of fn()."""
    c, t = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, cpu_seconds() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-documents", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workers", default="0,2", help="num_workers settings to time")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="kiln-bench-data-"))
    base = DataConfig(cache_dir=str(cache), vocab_size=args.vocab_size,
                      max_documents=args.max_documents)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    try:
        p, wall, cpu = timed(lambda: prepare(base, progress=False))
        mb = p.text_bytes / 1e6
        print(f"corpus: {p.train_docs + p.valid_docs} documents, {mb:.1f} MB, "
              f"{p.train_tokens + p.valid_tokens:,} tokens, vocab {p.vocab_size}")
        print(f"cold prepare (train BPE + tokenise + write): {wall:.2f} s wall, {cpu:.2f} s cpu")

        corpus = StdlibCorpus(max_documents=args.max_documents)
        texts = list(corpus.texts(range(len(corpus))))
        train_texts = [texts[i] for i in split_documents(corpus.keys, base.heldout_percent)[0]]
        _, wall, cpu = timed(lambda: train_tokenizer(train_texts, args.vocab_size))
        print(f"  of which BPE training alone: {wall:.2f} s wall, {cpu:.2f} s cpu")
        tok = Tokenizer.from_file(p.tokenizer_path)
        tok.encode_special_tokens = True  # as prepare encodes
        runs: dict[str, list[tuple[float, float]]] = {}

        def record(name, fn):
            _, w, c = timed(fn)
            runs.setdefault(name, []).append((w, c))

        def warm_prepare(workers):
            shutil.rmtree(p.dir)  # keep the cached tokenizer, rebuild the token files
            q = prepare(DataConfig(**{**base.__dict__, "num_workers": workers}), progress=False)
            assert not q.reused and q.train_tokens == p.train_tokens

        for _ in range(args.repeats):
            record("tokenizers encode_batch", lambda: tok.encode_batch(texts, add_special_tokens=False))
            for w in (int(x) for x in args.workers.split(",")):
                record(f"kiln prepare, num_workers={w}", lambda w=w: warm_prepare(w))
            record("tokenizers encode_batch_fast",
                   lambda: tok.encode_batch_fast(texts, add_special_tokens=False))
        q, wall, cpu = timed(lambda: prepare(base, progress=False))
        assert q.reused
        print(f"cache hit (prepare finds its folder): {wall:.2f} s wall, {cpu:.2f} s cpu")
        print(f"{'':36s} {'best MB/s':>9s} {'median MB/s':>11s} {'cpu s/run':>9s}")
        best = {}
        for name, rs in runs.items():
            walls = [w for w, _ in rs]
            best[name] = mb / min(walls)
            print(f"{name:36s} {best[name]:9.2f} {mb / statistics.median(walls):11.2f} "
                  f"{statistics.median(c for _, c in rs):9.2f}")
        for name in (n for n in runs if n.startswith("kiln")):
            print(f"ratio {name} / encode_batch: {best[name] / best['tokenizers encode_batch']:.2f}"
                  f"   / encode_batch_fast: {best[name] / best['tokenizers encode_batch_fast']:.2f}")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
