"""Sources: the stdlib corpus (order, split), local files through `datasets`, clear errors."""

import time

import numpy as np
import pytest

from tests.data.corpora import make_docs, write_jsonl, write_txt
from kiln.data.config import DataConfig
from kiln.data.errors import DataError
from kiln.data.sources import StdlibCorpus, heldout_score, open_corpus, split_documents


def test_stdlib_order_is_sorted_and_deterministic():
    a, b = StdlibCorpus(), StdlibCorpus()
    assert list(a.keys) == list(b.keys) == sorted(a.keys)
    assert len(a) > 500
    assert not any(("site-packages" in k) or ("dist-packages" in k) for k in a.keys)
    assert all(k.endswith(".py") for k in a.keys)
    assert list(StdlibCorpus(max_documents=7).keys) == list(a.keys)[:7]


def test_stdlib_texts_match_files():
    c = StdlibCorpus(max_documents=5)
    for key, text in zip(c.keys, c.texts(range(5))):
        assert text == (c.root / key).read_bytes().decode("utf-8", errors="replace")


def test_split_is_stable_and_near_the_percentage():
    keys = list(StdlibCorpus().keys)
    train, held = split_documents(keys, 2.0)
    train2, held2 = split_documents(keys, 2.0)
    assert np.array_equal(held, held2) and np.array_equal(train, train2)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(keys)))
    frac = len(held) / len(keys)
    # binomial: n~1800, p=0.02 -> sd ~0.33 percentage points; allow ~3 sd
    assert 0.01 <= frac <= 0.03, frac
    # the score depends on the key alone (sha256), not on the position or the process
    assert heldout_score("os.py") == heldout_score("os.py")
    assert all(heldout_score(keys[i]) < 2.0 for i in held)
    # a 20% split of 5000 synthetic keys is near 20%
    _, h = split_documents([f"doc/{i}" for i in range(5000)], 20.0)
    assert abs(len(h) / 5000 - 0.2) < 0.02


def test_split_keeps_both_sides_nonempty():
    train, held = split_documents(["a", "b"], 0.001)
    assert len(train) == 1 and len(held) == 1
    train, held = split_documents(["a", "b", "c"], 99.999)
    assert len(train) == 1 and len(held) == 2
    with pytest.raises(DataError, match="at least 2"):
        split_documents(["only"], 2.0)


def test_local_txt_and_jsonl(tmp_path):
    docs = make_docs(6)
    txt = write_txt(tmp_path / "t", docs[:3])
    jsl = write_jsonl(tmp_path / "j" / "d.jsonl", docs[3:], field="body")
    c = open_corpus(DataConfig(source=f"{txt},{jsl}", text_field="body",
                               cache_dir=str(tmp_path / "cache")), progress=False)
    # kinds in a fixed order (json before text), files sorted within a kind
    assert list(c.texts(range(len(c)))) == docs[3:] + docs[:3]
    assert list(c.texts([1, 4])) == [docs[4], docs[1]]
    c2 = open_corpus(DataConfig(source=str(tmp_path / "t"), max_documents=2,
                                cache_dir=str(tmp_path / "cache")), progress=False)
    assert list(c2.texts(range(len(c2)))) == docs[:2]


def test_empty_files_and_blank_documents_are_dropped(tmp_path):
    docs = make_docs(4)
    folder = tmp_path / "f"
    write_txt(folder, docs)
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("\n  \n\t\n")
    (folder / "empty.jsonl").write_text("")  # datasets cannot infer a schema from it
    c = open_corpus(DataConfig(source=str(folder), cache_dir=str(tmp_path / "cache")), progress=False)
    assert list(c.texts(range(len(c)))) == docs
    only = tmp_path / "only"
    only.mkdir()
    (only / "a.jsonl").write_text("")
    with pytest.raises(DataError, match="every file of data.source .* is empty"):
        open_corpus(DataConfig(source=str(only), cache_dir=str(tmp_path / "cache")), progress=False)


@pytest.mark.parametrize("unit,want", [
    ("document", ["one a\none b\n\n\ntwo\n\nthree\n"]),
    ("paragraph", ["one a\none b", "\ntwo", "three\n"]),  # `datasets` splits at "\n\n"
    ("line", ["one a", "one b", "two", "three"])])
def test_txt_text_units(tmp_path, unit, want):
    # one big .txt file is a common corpus: it can be split at blank lines or lines
    (tmp_path / "book.txt").write_text("one a\none b\n\n\ntwo\n\nthree\n")
    c = open_corpus(DataConfig(source=str(tmp_path / "book.txt"), text_unit=unit,
                               cache_dir=str(tmp_path / "c")), progress=False)
    got = list(c.texts(range(len(c.keys))))
    assert got == want


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(4)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    c = open_corpus(DataConfig(source=str(tmp_path / "d.parquet"), cache_dir=str(tmp_path / "c")),
                    progress=False)
    assert list(c.texts(range(4))) == docs


@pytest.mark.parametrize("source, match", [
    ("{tmp}/nope.jsonl", "does not exist"), ("{tmp}/*.nothing", "matches no files"),
    ("{tmp}/bad.csv", "not a .txt"),
])
def test_bad_paths_raise_data_error(tmp_path, source, match):
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=match) as e:
        open_corpus(DataConfig(source=source.format(tmp=tmp_path), cache_dir=str(tmp_path / "c")),
                    progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, body, match", [
    ("b.jsonl", b'{"text": "fine"}\n{"text": broken\n', r"b.jsonl \(line 2 is not JSON: "),
    ("c.txt", "d\u00e9j\u00e0 vu\n".encode("latin-1"), r"c.txt \(line 1 is not UTF-8: byte 0xe9 at column 2; "
                                                    r"convert the file to UTF-8"),
])
def test_unreadable_file_names_the_file_and_line(tmp_path, name, body, match):
    """`datasets` says only 'An error occurred while generating the dataset' (and for bad UTF-8
    names no file): kiln finds the file and line among several."""
    (tmp_path / "a.txt").write_text("a good file\n")
    (tmp_path / name).write_bytes(body)
    with pytest.raises(DataError, match=match) as e:
        open_corpus(DataConfig(source=f"{tmp_path}/a.txt,{tmp_path}/{name}", cache_dir=str(tmp_path / "c")),
                    progress=False)
    assert "\n" not in str(e.value) and "remove the file from data.source" in str(e.value)


def test_missing_text_field(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", ["x", "y"], field="content")
    with pytest.raises(DataError, match="no column 'text'.*content"):
        open_corpus(DataConfig(source=src, cache_dir=str(tmp_path / "c")), progress=False)


def test_missing_stdlib_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        StdlibCorpus(root=tmp_path / "nowhere")


def test_hub_source_fails_fast_offline(tmp_path, monkeypatch):
    # Port 9 on localhost refuses at once: the test never touches the network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    t = time.perf_counter()
    with pytest.raises(DataError, match="needs the Hugging Face hub") as e:
        open_corpus(DataConfig(source="hf:someone/some-data", cache_dir=str(tmp_path)), progress=False)
    assert time.perf_counter() - t < 10 and "\n" not in str(e.value)
