"""Megatron-core indexed datasets (.bin tokens + .idx index): write, validate, open.

kiln writes one document per sequence. Files written by Megatron's own tools (several
sequences per document) read back the same way: documents come from the .idx document index.
"""

import os
import struct
import warnings
from pathlib import Path

import numpy as np

from .errors import DataError

_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}


def megatron_indexed():
    """The megatron.core indexed_dataset module (imported lazily: the import takes seconds)."""
    with warnings.catch_warnings():
        # megatron.core's import warns about absent Transformer Engine/Apex and its own
        # deprecations: noise for kiln users, who only use the indexed-dataset reader.
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type:
    """uint16 while every id fits (Megatron's own rule), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexWriter:
    """Writes documents to `<prefix>.bin` / `<prefix>.idx` in Megatron's indexed-dataset format.

    Byte-identical to megatron.core's IndexedDatasetBuilder with one add_document per document
    (a test checks this). kiln writes the format itself because importing megatron.core costs
    5+ seconds, about a third of a whole `kiln prepare` of the default corpus.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = {np.dtype(v): k for k, v in _DTYPES.items()}[self.dtype]
        self._bin = open(self.prefix + ".bin", "wb", buffering=1 << 22)
        self._lengths: list[np.ndarray] = []
        self.docs = 0
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        """Append one document."""
        self.add_many(np.asarray(ids), np.array([len(ids)], dtype=np.int64))

    def add_many(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents stored back to back in `flat`."""
        flat = np.ascontiguousarray(flat, dtype=self.dtype)
        if int(lengths.sum()) != len(flat):
            raise ValueError(f"lengths sum to {int(lengths.sum())}, but {len(flat)} tokens were given")
        self._bin.write(memoryview(flat).cast("B"))
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.docs += len(lengths)
        self.tokens += len(flat)

    def finalize(self) -> None:
        """Write the .idx and fsync both files (the caller renames the folder into place)."""
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        if self.tokens >= 2**31 and np.any(lengths >= 2**31):
            raise ValueError("a document of 2**31 tokens or more does not fit the index format")
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with open(self.prefix + ".idx", "wb") as f:
            f.write(_HEADER + struct.pack("<QBQQ", 1, self._code, len(lengths), len(doc_idx)))
            for arr in (lengths.astype(np.int32), pointers, doc_idx):
                f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Close the .bin (idempotent; after an error the caller deletes the folder)."""
        self._bin.close()


def check_indexed(prefix: str | os.PathLike) -> str | None:
    """None if `<prefix>.idx/.bin` form a consistent indexed dataset, else what is wrong."""
    idx, bin_ = Path(str(prefix) + ".idx"), Path(str(prefix) + ".bin")
    for p in (idx, bin_):
        if not p.is_file():
            return f"{p.name} is missing"
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _HEADER:
        return f"{idx.name} has no Megatron index header"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in _DTYPES:
        return f"{idx.name} has version {version} / dtype code {code}"
    body = n_seq * (4 + 8) + n_doc * 8
    if size not in (_HEADER_BYTES + body, _HEADER_BYTES + body + n_seq):  # + modes if multimodal
        return f"{idx.name} is {size} bytes, its header promises {_HEADER_BYTES + body}"
    raw = np.memmap(idx, mode="r")
    lengths = np.frombuffer(raw, np.int32, n_seq, _HEADER_BYTES).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, n_seq, _HEADER_BYTES + 4 * n_seq)
    doc_idx = np.frombuffer(raw, np.int64, n_doc, _HEADER_BYTES + 12 * n_seq)
    itemsize = np.dtype(_DTYPES[code]).itemsize
    if n_doc < 1 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        return f"{idx.name} has an inconsistent document index"
    if np.any(lengths < 0):
        return f"{idx.name} has negative sequence lengths"
    ends = np.cumsum(lengths) * itemsize
    # The loader reads windows across sequences as one flat token stream: sequences must be
    # stored back to back, as Megatron's builder always writes them.
    if n_seq and (pointers[0] != 0 or np.any(pointers[1:] != ends[:-1])):
        return f"{idx.name} has sequence pointers that are not back to back"
    expected = int(ends[-1]) if n_seq else 0
    if bin_.stat().st_size != expected:
        return f"{bin_.name} is {bin_.stat().st_size} bytes, the index needs {expected}"
    return None


def open_indexed(prefix: str | os.PathLike, fix: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and open an indexed dataset: (tokens memmap, starts, ends) of its non-empty
    documents, ascending. DataError if missing or corrupt.

    kiln reads the format with numpy, as it writes it (IndexWriter): importing megatron.core for
    its IndexedDataset costs 5-10 s in every process that opens data, every rank of every run.
    Tests read the same files with megatron.core's reader and compare."""
    fix = fix or f"delete {prefix}.idx/.bin and run `kiln prepare` again"
    reason = check_indexed(prefix)
    if reason is None and Path(str(prefix) + ".bin").stat().st_size == 0:
        reason = f"{Path(str(prefix)).name}.bin holds no tokens"  # numpy cannot mmap empty files
    if reason:
        raise DataError(f"indexed dataset {prefix} is unusable ({reason}): {fix}")
    try:
        tokens, starts, ends = _read(prefix)
    except (ValueError, OSError) as e:
        raise DataError(f"indexed dataset {prefix} cannot be opened ({e}): {fix}") from None
    keep = ends > starts
    return tokens, starts[keep], ends[keep]


def read_documents(prefix: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens memmap, document starts, document ends) of a kiln indexed dataset, numpy only."""
    reason = check_indexed(prefix)
    if reason:
        raise DataError(f"indexed dataset {prefix} is unusable ({reason}): run `kiln prepare` again")
    return _read(prefix)


def _read(prefix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens memmap, document starts, document ends) of a checked indexed dataset."""
    idx = Path(str(prefix) + ".idx")
    raw = np.memmap(idx, mode="r")
    _, code, n_seq, n_doc = struct.unpack("<QBQQ", bytes(raw[9:_HEADER_BYTES]))
    lengths = np.frombuffer(raw, np.int32, n_seq, _HEADER_BYTES).astype(np.int64)
    doc_idx = np.frombuffer(raw, np.int64, n_doc, _HEADER_BYTES + 12 * n_seq)
    cum = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    starts, ends = cum[doc_idx[:-1]], cum[doc_idx[1:]]
    size = Path(str(prefix) + ".bin").stat().st_size
    tokens = np.memmap(str(prefix) + ".bin", dtype=_DTYPES[code], mode="r") if size else \
        np.zeros(0, dtype=_DTYPES[code])
    return tokens, starts, ends
