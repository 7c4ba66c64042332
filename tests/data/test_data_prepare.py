"""prepare(): exact tokens through megatron-core, cache reuse, atomicity, corruption errors."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.data import DataError, Prepared, prepare
from kiln.data.config import DataConfig
from kiln.data.indexed import IndexWriter, megatron_indexed, token_dtype
from kiln.data.sources import open_corpus, split_documents
from kiln.data.tokenizer import load_tokenizer
from tests.data.corpora import make_docs, write_jsonl


def reference_docs(cfg: DataConfig):
    """(train texts, held-out texts) exactly as prepare() splits them."""
    corpus = open_corpus(cfg, progress=False)
    train, held = split_documents(corpus.keys, cfg.heldout_percent)
    return list(corpus.texts(train)), list(corpus.texts(held))


def assert_matches_reference(p: Prepared, cfg: DataConfig):
    tok = load_tokenizer(p.tokenizer_path)
    mi = megatron_indexed()
    for prefix, texts in zip((p.train_prefix, p.valid_prefix), reference_docs(cfg)):
        ds = mi.IndexedDataset(prefix)  # megatron-core's own reader
        assert len(ds) == len(texts) and len(ds.document_indices) == len(texts) + 1
        assert ds.index.dtype == np.uint16
        for i, text in enumerate(texts):
            assert ds[i].tolist() == tok.encode(text).ids + [p.eot_id]


def test_tokens_read_back_exactly(small_cfg):
    p = prepare(small_cfg, progress=False)
    assert (p.eot_id, p.mask_id, p.pad_id) == (0, 1, 2) and p.vocab_size == 300
    train, held = reference_docs(small_cfg)
    assert (p.train_docs, p.valid_docs) == (len(train), len(held)) and len(held) >= 1
    assert p.train_tokens + p.valid_tokens == sum(
        len(load_tokenizer(p.tokenizer_path).encode(t).ids) + 1 for t in train + held)
    assert_matches_reference(p, small_cfg)


def test_stdlib_slice_reads_back_exactly(tmp_path):
    cfg = DataConfig(max_documents=25, vocab_size=500, seq_len=16, heldout_percent=20.0,
                     cache_dir=str(tmp_path), num_workers=0)
    p = prepare(cfg, progress=False)
    assert p.train_docs + p.valid_docs == 25
    assert_matches_reference(p, cfg)


def test_special_token_text_in_documents_stays_text(tmp_path):
    docs = ["before <|endoftext|> after <|mask|> end"] * 3 + make_docs(10)
    cfg = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", docs), vocab_size=300, seq_len=4,
                     heldout_percent=20.0, cache_dir=str(tmp_path / "c"), num_workers=0)
    p = prepare(cfg, progress=False)
    ds = megatron_indexed().IndexedDataset(p.train_prefix)
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[-1] == p.eot_id and p.eot_id not in ids[:-1] and p.mask_id not in ids


def test_second_prepare_reuses_the_cache(small_cfg, monkeypatch):
    p1 = prepare(small_cfg, progress=False)
    mtimes = {f.name: f.stat().st_mtime_ns for f in Path(p1.dir).iterdir()}
    prep = sys.modules["kiln.data.prepare"]  # the package attribute `prepare` is the function
    monkeypatch.setattr(prep, "_build", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    p2 = prepare(small_cfg, progress=False)
    assert p2.reused and not p1.reused
    assert dataclasses.replace(p2, reused=False) == p1
    assert {f.name: f.stat().st_mtime_ns for f in Path(p2.dir).iterdir()} == mtimes
    # other documents -> another folder
    monkeypatch.undo()
    other = dataclasses.replace(small_cfg, max_documents=30)
    assert prepare(other, progress=False).dir != p1.dir


def test_error_mid_write_leaves_no_folder(small_cfg, monkeypatch):
    calls = []

    def failing_add_many(self, flat, lengths):
        calls.append(len(lengths))
        if len(calls) == 2:  # the train split is written, the held-out split is not
            raise RuntimeError("simulated crash")
        original(self, flat, lengths)

    original = IndexWriter.add_many
    monkeypatch.setattr(IndexWriter, "add_many", failing_add_many)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare(small_cfg, progress=False)
    cache = Path(small_cfg.cache_dir)
    assert not list(cache.glob("data-*")) and not list(cache.glob(".tmp-*"))
    monkeypatch.undo()
    assert_matches_reference(prepare(small_cfg, progress=False), small_cfg)


CRASH = """
import os, signal, sys
from kiln.data.config import DataConfig
from kiln.data.indexed import IndexWriter
from kiln.data import prepare
original = IndexWriter.add_many
def add_many(self, flat, lengths):
    original(self, flat, lengths)
    self._bin.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # die like a power cut: no cleanup runs
IndexWriter.add_many = add_many
prepare(DataConfig(**{cfg}), progress=False)
"""


@pytest.mark.slow
def test_killed_process_leaves_nothing_trusted(small_cfg):
    cfg = dataclasses.asdict(small_cfg)
    r = subprocess.run([sys.executable, "-c", CRASH.format(cfg=cfg)], cwd=os.getcwd(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    cache = Path(small_cfg.cache_dir)
    assert not list(cache.glob("data-*"))  # nothing under the final name
    leftovers = list(cache.glob(".tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "train.bin").stat().st_size > 0
    p = prepare(small_cfg, progress=False)  # rebuilds, and sweeps the dead process's temp
    assert not p.reused and not list(cache.glob(".tmp-*"))
    assert_matches_reference(p, small_cfg)


def test_sweep_removes_temps_of_unreaped_killed_processes(tmp_path):
    """In a container whose pid 1 reaps nothing, a SIGKILLed prepare stays a zombie, which still
    answers kill(pid, 0); its temp must be swept all the same, and a live process's kept."""
    import socket
    import time

    from kiln.data.manifest import remove_stale_temps

    host = socket.gethostname()
    child = subprocess.Popen(["sleep", "60"])
    try:
        child.send_signal(signal.SIGKILL)  # not waited on: a zombie until reaped below
        stat = Path(f"/proc/{child.pid}/stat")
        for _ in range(200):
            if stat.read_text().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.01)
        os.kill(child.pid, 0)  # the zombie still answers
        dead, live = tmp_path / f".tmp-{host}-{child.pid}-abc", tmp_path / f".tmp-{host}-{os.getpid()}-abc"
        dead.mkdir(), live.mkdir()
        remove_stale_temps(tmp_path)
        assert not dead.exists() and live.exists()
    finally:
        child.wait()


def test_unfinished_or_damaged_cache_is_rebuilt(small_cfg):
    p = prepare(small_cfg, progress=False)
    (Path(p.dir) / "manifest.json").unlink()  # e.g. a folder copied half-way by hand
    p2 = prepare(small_cfg, progress=False)
    assert not p2.reused and p2.dir == p.dir
    with open(p2.train_prefix + ".bin", "r+b") as f:
        f.write(b"\xff\xff")
    p3 = prepare(small_cfg, progress=False)
    assert not p3.reused
    assert_matches_reference(p3, small_cfg)


def _damage(dir_: Path, how: str):
    if how == "truncated bin":
        with open(dir_ / "train.bin", "r+b") as f:
            f.truncate(os.path.getsize(dir_ / "train.bin") - 3)
    elif how == "flipped bin byte":
        with open(dir_ / "train.bin", "r+b") as f:
            f.seek(5)
            b = f.read(1)
            f.seek(5)
            f.write(bytes([b[0] ^ 1]))
    elif how == "bad idx header":
        with open(dir_ / "train.idx", "r+b") as f:
            f.write(b"NOTANIDX")
    elif how == "truncated idx":
        with open(dir_ / "valid.idx", "r+b") as f:
            f.truncate(40)
    elif how == "no manifest":
        (dir_ / "manifest.json").unlink()
    elif how == "bad manifest":
        (dir_ / "manifest.json").write_text("{")


@pytest.mark.parametrize("how", ["truncated bin", "flipped bin byte", "bad idx header",
                                 "truncated idx", "no manifest", "bad manifest"])
def test_corrupt_files_raise_data_error(small_cfg, tmp_path, how):
    p = prepare(small_cfg, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(p.dir, copy)
    Prepared.load(copy)
    _damage(copy, how)
    with pytest.raises(DataError, match="corrupt") as e:
        Prepared.load(copy)
    msg = str(e.value)
    assert "\n" not in msg and str(copy) in msg and "kiln prepare" in msg


@pytest.mark.parametrize("how", ["truncated bin", "bad idx header", "truncated idx"])
def test_loader_rejects_corrupt_files(small_cfg, tmp_path, how):
    from kiln.data.loader import ChunkLoader

    p = prepare(small_cfg, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(p.dir, copy)
    _damage(copy, how)
    prefix = copy / ("valid" if how == "truncated idx" else "train")
    with pytest.raises(DataError, match="unusable") as e:
        ChunkLoader(str(prefix), 4, 2, 0, 1, seed=0)
    assert "\n" not in str(e.value)


def test_token_dtype_follows_megatron_rule():
    assert token_dtype(4096) is np.uint16 and token_dtype(65499) is np.uint16
    assert token_dtype(65500) is np.int32 and token_dtype(200_000) is np.int32
    assert megatron_indexed().DType.optimal_dtype(65499) is token_dtype(65499)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_is_byte_identical_to_megatron_builder(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(1, 50)).astype(dtype) for _ in range(30)]
    ours = IndexWriter(tmp_path / "ours", dtype)
    ours.add(docs[0])
    ours.add_many(np.concatenate(docs[1:]), np.array([len(d) for d in docs[1:]]))
    ours.finalize()
    theirs = megatron_indexed().IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for d in docs:
        theirs.add_document(d, [len(d)])
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def test_empty_and_tiny_corpora(tmp_path):
    def cfg(docs, **kw):
        src = write_jsonl(tmp_path / f"{len(docs)}-{abs(hash(tuple(docs)))}.jsonl", docs)
        return DataConfig(source=src, vocab_size=300, seq_len=4, cache_dir=str(tmp_path / "c"),
                          num_workers=0, **kw)

    with pytest.raises(DataError, match="no text"):
        prepare(cfg(["", ""]), progress=False)
    with pytest.raises(DataError, match="at least 2"):
        prepare(cfg(["one lonely document"]), progress=False)
    with pytest.raises(DataError, match="seq_len"):
        prepare(dataclasses.replace(cfg(make_docs(10)), seq_len=100_000), progress=False)


def test_given_tokenizer_is_used(small_cfg, tmp_path):
    p = prepare(small_cfg, progress=False)
    mine = dataclasses.replace(small_cfg, tokenizer=p.tokenizer_path, vocab_size=999,
                               cache_dir=str(tmp_path / "other"))
    q = prepare(mine, progress=False)
    assert q.vocab_size == 300
    assert Path(q.train_prefix + ".bin").read_bytes() == Path(p.train_prefix + ".bin").read_bytes()
    with pytest.raises(DataError, match="does not exist"):
        prepare(dataclasses.replace(mine, tokenizer=str(tmp_path / "none.json")), progress=False)


@pytest.mark.slow
def test_worker_processes_match_in_process(small_cfg, tmp_path):
    a = prepare(small_cfg, progress=False)
    b = prepare(dataclasses.replace(small_cfg, num_workers=2, cache_dir=str(tmp_path / "w")),
                progress=False)
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "tokenizer.json"):
        assert (Path(a.dir) / name).read_bytes() == (Path(b.dir) / name).read_bytes()
    assert json.loads((Path(a.dir) / "manifest.json").read_text())["files"] == \
        json.loads((Path(b.dir) / "manifest.json").read_text())["files"]
