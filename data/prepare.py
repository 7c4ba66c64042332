"""`kiln prepare`: corpus -> tokenizer -> Megatron indexed token files, cached and atomic.

Layout of a prepared folder `<cache_dir>/data-<key>/` (key = hash of tokenizer + documents):
  tokenizer.json             the tokenizer the ids belong to (special tokens included)
  train.bin / train.idx      training documents, one per entry, each ending with EOT
  valid.bin / valid.idx      held-out documents, same format
  manifest.json              written last: counts, sizes and sha256 of every file
  decompose-b08-13-s0/       only with data.packing=decompose: one dataset per bucket
                             (kiln.data.decompose; its own manifest, built the same way)
The folder is built under a temporary name and renamed into place, so an interrupted run
never leaves a folder that a later run trusts.
"""

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import DataConfig
from .encode import Encoder
from .errors import DataError
from .indexed import IndexWriter, check_indexed, token_dtype
from .manifest import publish, remove_stale_temps, sha256_file, temp_dir
from .sources import Corpus, open_corpus, split_documents
from .tokenizer import (cached_tokenizer, load_tokenizer, special_ids, tokenizer_path,
                        write_atomic)

FORMAT = "kiln-prepared-v1"
SPLITS = ("train", "valid")


@dataclass
class Prepared:
    """A prepared data folder: where its files are and what they hold."""

    dir: str
    tokenizer_path: str
    train_prefix: str
    valid_prefix: str
    vocab_size: int
    eot_id: int
    mask_id: int
    pad_id: int
    train_tokens: int
    valid_tokens: int
    train_docs: int
    valid_docs: int
    dtype: str = "uint16"
    source: str = ""
    text_bytes: int = 0
    reused: bool = False  # True when prepare() found this folder in the cache

    @classmethod
    def load(cls, dir: str | os.PathLike, *, checksum: bool = True) -> "Prepared":
        """Open a prepared folder, checking every file against its manifest.

        checksum=False skips hashing the token files (sizes and index structure are still
        checked): useful on ranks that open data another rank has just verified.
        """
        d = Path(dir)
        m = _read_manifest(d)
        for name, meta in m["files"].items():
            p = d / name
            if not p.is_file():
                _corrupt(d, f"{name} is missing")
            if p.stat().st_size != meta["bytes"]:
                _corrupt(d, f"{name} is {p.stat().st_size} bytes, the manifest says {meta['bytes']}")
            if (checksum or name.endswith((".idx", ".json"))) and sha256_file(p) != meta["sha256"]:
                _corrupt(d, f"{name} does not match its checksum")
        for split in SPLITS:
            reason = check_indexed(d / split)
            if reason:
                _corrupt(d, reason)
        s = m["splits"]
        return cls(dir=str(d), tokenizer_path=str(d / "tokenizer.json"), train_prefix=str(d / "train"),
                   valid_prefix=str(d / "valid"), vocab_size=m["vocab_size"], eot_id=m["eot_id"],
                   mask_id=m["mask_id"], pad_id=m["pad_id"], train_tokens=s["train"]["tokens"],
                   valid_tokens=s["valid"]["tokens"], train_docs=s["train"]["docs"],
                   valid_docs=s["valid"]["docs"], dtype=m["dtype"], source=m["source"],
                   text_bytes=m["text_bytes"])

    def tokenizer(self):
        """The tokenizers.Tokenizer these token ids belong to."""
        return load_tokenizer(self.tokenizer_path)


def _corrupt(d: Path, reason: str):
    raise DataError(f"prepared data {d} is corrupt ({reason}): delete {d} or run `kiln prepare` again")


def _read_manifest(d: Path) -> dict:
    if not d.is_dir():
        raise DataError(f"prepared data folder {d} does not exist: run `kiln prepare` first")
    path = d / "manifest.json"
    if not path.is_file():
        _corrupt(d, "manifest.json is missing, so the folder was never finished")
    try:
        m = json.loads(path.read_text())
        if m.get("format") != FORMAT:
            _corrupt(d, f"format {m.get('format')!r}, this kiln reads {FORMAT!r}")
        _ = m["files"], m["splits"]["train"]["tokens"], m["splits"]["valid"]["tokens"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        _corrupt(d, f"manifest.json is unreadable: {type(e).__name__}")
    return m


def _hash_corpus(corpus: Corpus, train_idx, valid_idx) -> tuple[str, str, int]:
    """(hash of training texts, hash of all texts with their split, total utf-8 bytes)."""
    train_h, all_h, total = hashlib.sha256(), hashlib.sha256(), 0
    is_valid = set(valid_idx.tolist())
    for i, text in enumerate(corpus.texts(range(len(corpus)))):
        data = text.encode("utf-8", "surrogatepass")
        head = len(data).to_bytes(8, "little")  # length-prefixed: document borders count
        total += len(data)
        if i in is_valid:
            all_h.update(b"V" + head + data)
        else:
            train_h.update(head + data)
            all_h.update(b"T" + head + data)
    return train_h.hexdigest(), all_h.hexdigest(), total


def needle_chars(cfg: DataConfig) -> int:
    """Longest needle document in characters: about one data.seq_len window (~2 characters per
    token of the small byte-level BPEs), so needle and query mostly land in the same sample."""
    return 2 * cfg.seq_len


def _with_needles(corpus, train_idx, valid_idx, cfg):
    """The corpus with data.synthetic_needles of needle documents among the training documents
    (kiln.data.needles), its new split indices and its text size."""
    from .needles import NeedleCorpus

    nc = NeedleCorpus(corpus, train_idx, valid_idx, cfg.synthetic_needles, needle_chars(cfg))
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in nc.texts(range(len(nc))))
    return nc, nc.train_idx, nc.valid_idx, text_bytes


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[kiln prepare] {msg}", file=sys.stderr, flush=True)


def prepare(cfg: DataConfig, *, progress: bool = True, repair: bool = True) -> Prepared:
    """Tokenise `cfg.source` into a cached prepared folder (reused when it is already valid).

    A cached folder that fails validation is rebuilt when `repair` (what `kiln prepare` does);
    otherwise its DataError is raised, so a training run never silently replaces files.
    Call it on one rank (e.g. rank 0) and let the others `Prepared.load(dir)` after a barrier.
    """
    cfg.validate()
    t0 = time.perf_counter()
    corpus = open_corpus(cfg, progress)
    train_idx, valid_idx = split_documents(corpus.keys, cfg.heldout_percent)
    train_hash, all_hash, text_bytes = _hash_corpus(corpus, train_idx, valid_idx)
    if text_bytes == 0:
        raise DataError(f"the corpus {corpus.name} has {len(corpus)} documents but no text: check "
                        "data.source and data.text_field")
    cache = Path(cfg.cache_dir).resolve()  # absolute, so the paths survive a later chdir
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        t, cached = time.perf_counter(), tokenizer_path(cache, train_hash, cfg.vocab_size).exists()
        path = cached_tokenizer(cache, train_hash, cfg.vocab_size, corpus.texts(train_idx),
                                len(train_idx))
        tok = load_tokenizer(path)
        _log(progress, f"tokenizer {path} ({'cached' if cached else 'trained'}, "
                       f"{time.perf_counter() - t:.1f}s)")
    tok_json = tok.to_str()
    tag = ""
    if cfg.synthetic_needles > 0:  # after the tokenizer: it is trained on the real documents only
        corpus, train_idx, valid_idx, text_bytes = _with_needles(corpus, train_idx, valid_idx, cfg)
        tag = f"|needles={cfg.synthetic_needles!r}/{needle_chars(cfg)}"
    key = hashlib.sha256(f"{FORMAT}|{hashlib.sha256(tok_json.encode()).hexdigest()}|{all_hash}{tag}"
                         .encode()).hexdigest()
    final = cache / f"data-{key[:20]}"
    if final.exists():
        try:
            prepared = Prepared.load(final)
            prepared.reused = True
            _log(progress, f"reusing {final}")
        except DataError as e:
            if not repair:
                raise
            _log(progress, f"rebuilding: {e}")
            shutil.rmtree(final, ignore_errors=True)
        else:  # outside the try: a decomposition problem must not delete the tokenised folder
            return _finish(prepared, cfg, progress, repair)
    prepared = _build(cfg, corpus, tok, tok_json, (train_idx, valid_idx), text_bytes, key, final,
                      progress)
    _log(progress, f"{text_bytes / 1e6:.1f} MB -> {prepared.train_tokens + prepared.valid_tokens:,} "
                   f"tokens in {time.perf_counter() - t0:.1f}s: {final}")
    return _finish(prepared, cfg, progress, repair)


def _build(cfg, corpus, tok, tok_json, splits, text_bytes, key, final, progress) -> Prepared:
    from tqdm import tqdm

    cache = final.parent
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cache)
    tmp = temp_dir(cache, key[:12])
    try:
        ids = special_ids(tok)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab)
        write_atomic(tmp / "tokenizer.json", tok_json.encode())
        counts = {}
        with Encoder(tok_json, ids.eot, dtype, cfg.num_workers) as encoder, tqdm(
                total=text_bytes, unit="B", unit_scale=True, desc="tokenise", disable=not progress,
                file=sys.stderr) as bar:
            for split, idx in zip(SPLITS, splits):
                writer = IndexWriter(tmp / split, dtype)
                try:
                    for flat, lengths, nbytes in encoder.stream(corpus.texts(idx)):
                        writer.add_many(flat, lengths)
                        bar.update(nbytes)
                    writer.finalize()
                finally:
                    writer.close()
                counts[split] = {"docs": writer.docs, "tokens": writer.tokens}
        fields = {"format": FORMAT, "key": key, "source": corpus.name, "vocab_size": vocab,
                  "eot_id": ids.eot, "mask_id": ids.mask, "pad_id": ids.pad,
                  "dtype": dtype.__name__, "text_bytes": text_bytes,
                  "heldout_percent": cfg.heldout_percent, "splits": counts}
        if not publish(tmp, final, fields):
            return Prepared.load(final)  # another process finished the same folder first
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(final)  # a failed close() names no file: say what was being written
        raise
    return Prepared.load(final, checksum=False)


def _finish(p: Prepared, cfg: DataConfig, progress: bool, repair: bool) -> Prepared:
    _check_seq_len(p, cfg)
    if cfg.packing == "decompose":  # bucket files go into a subfolder (see data/decompose.py)
        from .decompose import decompose

        decompose(p, cfg.buckets, cfg.decompose_seed, progress=progress, repair=repair, rule=cfg.long_doc_rule)
    return p


def _check_seq_len(p: Prepared, cfg: DataConfig) -> Prepared:
    for split, tokens in (("training", p.train_tokens), ("held-out", p.valid_tokens)):
        if tokens < cfg.seq_len + 1:  # a small training split needs a smaller held-out share, not a bigger one
            share = "raise" if split == "held-out" else "lower"
            raise DataError(f"the {split} split has {tokens} tokens, fewer than data.seq_len+1="
                            f"{cfg.seq_len + 1}: lower data.seq_len, {share} data.heldout_percent "
                            f"(now {cfg.heldout_percent}), or add documents")
    return p


def summary(p: Prepared) -> str:
    """A short human-readable account of a prepared folder."""
    d = asdict(p)
    return ", ".join(f"{k}={d[k]}" for k in ("dir", "vocab_size", "train_docs", "train_tokens",
                                            "valid_docs", "valid_tokens"))

