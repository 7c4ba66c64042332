"""Byte-level BPE: train one deterministically (cached by content hash) or load a tokenizer.json.

Special tokens (ids 0, 1, 2 in a trained tokenizer):
  <|endoftext|>  EOT, appended to every document
  <|mask|>       MASK, used by MEAP and the ELECTRA generator
  <|pad|>        PAD
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError

EOT, MASK, PAD = "<|endoftext|>", "<|mask|>", "<|pad|>"
SPECIAL_TOKENS = (EOT, MASK, PAD)
# Bump when the training recipe below changes, so cached tokenizers are not reused wrongly.
_RECIPE = "kiln-bytelevel-bpe-v1"


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the special tokens."""

    eot: int
    mask: int
    pad: int


def special_ids(tok: Tokenizer) -> SpecialIds:
    """The ids of EOT, MASK and PAD in `tok` (which must contain all three)."""
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if None in ids:
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
        raise DataError(f"tokenizer lacks special tokens {missing}: load it with "
                        "kiln.data.tokenizer.load_tokenizer, which adds them")
    return SpecialIds(*ids)


def new_bpe() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (GPT-2 style pre-tokenisation, no prefix space)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens on `texts`.

    Deterministic: the same texts in the same order give a byte-identical tokenizer.json.
    All 256 byte symbols are in the vocabulary, so any text can be encoded; the vocabulary
    can end up smaller than `vocab_size` when the corpus has too few distinct pairs.
    """
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def tokenizer_key(train_hash: str, vocab_size: int) -> str:
    """Cache key of a trained tokenizer: recipe, library version, size, specials, training text."""
    h = hashlib.sha256()
    for part in (_RECIPE, tokenizers.__version__, str(vocab_size), *SPECIAL_TOKENS, train_hash):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def tokenizer_path(cache_dir: str | os.PathLike, train_hash: str, vocab_size: int) -> Path:
    """Where the tokenizer for these training documents and size is cached."""
    key = tokenizer_key(train_hash, vocab_size)
    return Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key[:20]}.json"


def cached_tokenizer(cache_dir: str | os.PathLike, train_hash: str, vocab_size: int,
                     texts: Iterable[str], length: int | None = None) -> Path:
    """Path of the tokenizer trained on the documents hashing to `train_hash`; trains it if absent.

    `texts` is only consumed when the tokenizer is not cached yet.
    """
    path = tokenizer_path(cache_dir, train_hash, vocab_size)
    if path.exists():
        try:
            load_tokenizer(path)
            return path
        except DataError:
            pass  # a damaged cache entry is simply retrained
    tok = train_tokenizer(texts, vocab_size, length)
    write_atomic(path, tok.to_str().encode())
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json; adds any of EOT/MASK/PAD it lacks (as new special tokens)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file {p} does not exist: fix data.tokenizer or leave it empty "
                        "to train one")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"tokenizer file {p} cannot be loaded ({first}): point data.tokenizer at "
                        "a valid tokenizer.json or leave it empty to train one") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
