"""Document sources: the embedded stdlib corpus, local text/jsonl/parquet files, hub datasets.

A Corpus is an ordered, re-readable list of documents, each with a stable key (relative path
or row index). The train/held-out split is a pure function of those keys, so it never changes
between runs, machines or Python versions.
"""

import abc
import glob
import hashlib
import json
import os
import socket
import sysconfig
import urllib.parse
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .config import DataConfig
from .errors import DataError, storage_message

_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Corpus(abc.ABC):
    """Ordered documents: `keys[i]` names document i, `texts(indices)` yields their text."""

    name: str
    keys: Sequence[str]

    def __len__(self) -> int:
        return len(self.keys)

    @abc.abstractmethod
    def texts(self, indices: Sequence[int]) -> Iterator[str]:
        """Yield the text of each document in `indices` (ascending), in that order."""


class StdlibCorpus(Corpus):
    """Every .py file of this interpreter's standard library (outside site-/dist-packages).

    Documents are taken in sorted relative-path order; files that are not valid UTF-8 are
    read with errors="replace". The text is read once and kept in memory (~35 MB).
    """

    def __init__(self, root: str | os.PathLike | None = None, max_documents: int = 0):
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        self.name = f"stdlib:{self.root}"
        if not self.root.is_dir():
            raise DataError(f"the stdlib corpus folder {self.root} does not exist: use a Python "
                            "installed with its standard library sources, or set data.source")
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            rel = Path(dirpath).relative_to(self.root)
            keys += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
        keys.sort()
        self.keys = keys[:max_documents] if max_documents else keys
        self._cache: list[str] | None = None

    def _read_all(self) -> list[str]:
        if self._cache is None:
            out = []
            for key in self.keys:
                try:
                    with open(self.root / key, encoding="utf-8", errors="replace") as f:
                        out.append(f.read())
                except OSError as e:
                    raise DataError(f"cannot read corpus file {self.root / key} ({e.strerror}): "
                                    "fix its permissions or choose another data.source") from None
            self._cache = out
        return self._cache

    def texts(self, indices: Sequence[int]) -> Iterator[str]:
        cache = self._read_all()
        return (cache[i] for i in indices)


class _RowKeys(Sequence):
    """Keys "0", "1", ... for row-indexed sources, without materialising a list."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [str(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return str(i % self.n)


class DatasetsCorpus(Corpus):
    """Rows of one or more Hugging Face `datasets.Dataset`s (Arrow, memory-mapped), concatenated."""

    _BLOCK = 1024

    def __init__(self, name: str, parts: list[tuple], max_documents: int = 0):
        """`parts`: (dataset, text column) pairs, read in order."""
        self.name = name
        self.parts = []
        total = 0
        for ds, column in parts:
            if column not in ds.column_names:
                raise DataError(f"{name} has no column {column!r} (columns: "
                                f"{', '.join(ds.column_names)}): set data.text_field")
            n = len(ds) if not max_documents else min(len(ds), max_documents - total)
            if n > 0:
                self.parts.append((ds.select_columns([column]), column, total, n))
                total += n
        self.keys = _RowKeys(total)

    def texts(self, indices: Sequence[int]) -> Iterator[str]:
        idx = np.asarray(indices, dtype=np.int64)
        for ds, column, offset, n in self.parts:
            for b in range(0, n, self._BLOCK):
                lo, hi = np.searchsorted(idx, [offset + b, offset + min(b + self._BLOCK, n)])
                if lo == hi:
                    continue
                rows = ds[b:min(b + self._BLOCK, n)][column]
                for i in idx[lo:hi]:
                    yield _as_text(rows[int(i) - offset - b], column)


def _as_text(value, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"column {column!r} holds {type(value).__name__} values, not text: "
                        "set data.text_field to a text column")
    return value


def expand_paths(source: str) -> list[Path]:
    """Files named by a path, glob, folder, or comma list of those (sorted, deduplicated)."""
    files: list[Path] = []
    for item in (s.strip() for s in source.split(",")):
        if not item:
            continue
        if glob.has_magic(item):
            hits = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not hits:
                raise DataError(f"data.source pattern {item!r} matches no files: fix data.source")
            candidates = [Path(h) for h in hits if Path(h).is_file()]
        else:
            p = Path(item).expanduser()
            if not p.exists():
                raise DataError(f"data.source path {p} does not exist: fix data.source")
            candidates = sorted(q for q in p.rglob("*") if q.suffix in _KINDS) if p.is_dir() else [p]
            if p.is_dir() and not candidates:
                raise DataError(f"folder {p} holds no .txt/.jsonl/.parquet files: fix data.source")
        for c in candidates:
            if c.suffix not in _KINDS:
                raise DataError(f"{c} is not a .txt, .jsonl/.json or .parquet file: convert it or "
                                "remove it from data.source")
            if not os.access(c, os.R_OK):
                raise DataError(f"cannot read {c} (permission denied): fix its permissions")
            files.append(c)
    return sorted(set(files), key=lambda q: (_KINDS[q.suffix], str(q)))


def _datasets(progress: bool):
    import datasets  # slow import, only for non-stdlib sources

    datasets.logging.set_verbosity_error()
    if progress:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    return datasets


def local_corpus(cfg: DataConfig, progress: bool = True) -> DatasetsCorpus:
    """The files of `cfg.source` read through `datasets` (one .txt file = one document)."""
    files = expand_paths(cfg.source)
    if not files:
        raise DataError(f"data.source {cfg.source!r} names no files: fix data.source")
    # 0-byte files hold no document (and `datasets` cannot infer a schema from an empty .jsonl)
    empty = [f for f in files if f.stat().st_size == 0]
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise DataError(f"every file of data.source {cfg.source!r} is empty ({len(empty)}, e.g. {empty[0]}): "
                        "add text to them or point data.source at the corpus")
    datasets = _datasets(progress)
    parts = []
    for kind in sorted({_KINDS[f.suffix] for f in files}):
        group = [str(f) for f in files if _KINDS[f.suffix] == kind]
        extra = {"sample_by": cfg.text_unit} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=group, split="train",
                                       cache_dir=str(Path(cfg.cache_dir) / "hf"), **extra)
        except Exception as e:
            refused = _refused_write(e)  # `datasets` writes its cache under data.cache_dir/hf
            raise DataError(refused or _unreadable(kind, group, e)) from None
        if kind == "text":  # blank lines, paragraphs or whole files are not documents
            ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        # `datasets` names the column of plain text files "text" whatever data.text_field says
        parts.append((ds, "text" if kind == "text" else cfg.text_field))
    return DatasetsCorpus(f"files:{cfg.source}", parts, cfg.max_documents)


def _hub_reachable() -> str | None:
    """None if the hub answers a TCP connect (or offline mode is set); else the reason."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
        return None
    except OSError as e:
        return f"cannot reach {url.hostname}:{port}: {e.strerror or e}"


def hub_corpus(cfg: DataConfig, progress: bool = True) -> DatasetsCorpus:
    """The train split of a hub dataset `hf:<name>[:<config>]` (needs network, or a warm cache)."""
    name, _, config = cfg.source[3:].partition(":")
    reason = _hub_reachable()
    if reason:
        raise DataError(f"data.source {cfg.source} needs the Hugging Face hub ({reason}): "
                        "connect to the network, or use a local path or 'stdlib'")
    datasets = _datasets(progress)
    try:
        ds = datasets.load_dataset(name, config or None, split="train",
                                   cache_dir=str(Path(cfg.cache_dir) / "hf"), **remote_code_kwargs(cfg, datasets))
    except Exception as e:
        if refused := _refused_write(e):
            raise DataError(refused) from None
        raise DataError(f"cannot load hub dataset {name!r} ({_first_line(e)}): check the name, "
                        "config and network, or use a local path") from None
    return DatasetsCorpus(cfg.source, [(ds, cfg.text_field)], cfg.max_documents)


def _refused_write(e: BaseException) -> str | None:
    """The storage line (kiln.data.errors.storage_message) of a full or read-only disk anywhere in the
    exception's causes, else None: such a file is fine, the cache it was being copied into is not."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and (line := storage_message(e)):
            return line
        e = e.__cause__ or e.__context__
    return None


def remote_code_kwargs(cfg: DataConfig, datasets) -> dict:
    """load_dataset's trust_remote_code, always explicit: datasets 2.x/3.x run a repository's loading
    script when it is true (2.x asked, or ran it, by default); datasets >= 4 has no scripts and would
    only log an error for it, so a recipe that asks for one gets one line instead."""
    major = int(datasets.__version__.split(".")[0])
    if major < 4:
        return {"trust_remote_code": cfg.trust_remote_code}
    if cfg.trust_remote_code:
        raise DataError(f"data.trust_remote_code=true, but datasets {datasets.__version__} runs no dataset "
                        "loading scripts (removed in datasets 4): use a dataset in a plain format (parquet, "
                        "jsonl, text) and set data.trust_remote_code=false")
    return {}


def _unreadable(kind: str, group: list, e: BaseException) -> str:
    """The message for files `datasets` could not load: the file and line at fault where kiln can
    find them (datasets names neither for bad UTF-8), and the innermost cause."""
    cause = e
    while type(cause).__name__ == "DatasetGenerationError" and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    where = f"{kind} files {group[:3]}{'...' if len(group) > 3 else ''}"
    for f in group[:1000]:  # the error path only: find the first bad file
        bad = _first_bad_line(f, kind)
        if bad:
            return f"cannot read {f} ({bad}): fix it or remove the file from data.source"
    hint = " (convert it to UTF-8, e.g. iconv -f latin1 -t utf-8)" if isinstance(cause, UnicodeDecodeError) else ""
    return f"cannot read {where} ({_first_line(cause)}){hint}: fix or remove them"


def _first_bad_line(path: str, kind: str) -> str | None:
    """'line N: why' for the first line of a .txt/.jsonl file that is not UTF-8 (or not JSON)."""
    if kind not in ("text", "json"):
        return None
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as u:
                    return (f"line {n} is not UTF-8: byte {raw[u.start]:#04x} at column {u.start + 1}; "
                            "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8")
                if kind == "json" and path.endswith(".jsonl") and line.strip():
                    try:
                        json.loads(line)
                    except ValueError as j:
                        return f"line {n} is not JSON: {j}"
    except OSError as o:
        return o.strerror
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def open_corpus(cfg: DataConfig, progress: bool = True) -> Corpus:
    """The corpus named by `cfg.source`."""
    if cfg.source == "stdlib":
        return StdlibCorpus(max_documents=cfg.max_documents)
    if cfg.source.startswith("hf:"):
        return hub_corpus(cfg, progress)
    return local_corpus(cfg, progress)


def heldout_score(key: str) -> float:
    """A stable pseudo-random number in [0, 100) for a document key (sha256, not hash())."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 * 100.0


def split_documents(keys: Sequence[str], heldout_percent: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), ascending: held out iff the key's score < percent.

    With at least two documents both splits are non-empty: if none (or all) fall below the
    threshold, the single lowest-scoring (or highest-scoring) document is moved across.
    """
    if len(keys) < 2:
        raise DataError(f"the corpus has {len(keys)} document(s); kiln needs at least 2 (training "
                        "+ held out): add documents, raise data.max_documents, or split .txt files "
                        "with data.text_unit=paragraph (or line)")
    scores = np.fromiter((heldout_score(k) for k in keys), dtype=np.float64, count=len(keys))
    held = scores < heldout_percent
    if not held.any():
        held[np.argmin(scores)] = True
    if held.all():
        held[np.argmax(scores)] = False
    return np.flatnonzero(~held), np.flatnonzero(held)
