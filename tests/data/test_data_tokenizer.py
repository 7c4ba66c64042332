"""Tokenizer: deterministic training, stable special ids, caching, clear load errors."""

import json

import pytest

from kiln.data.errors import DataError
from kiln.data.sources import StdlibCorpus
from kiln.data.tokenizer import (cached_tokenizer, load_tokenizer, special_ids,
                                 train_tokenizer)
from tests.data.corpora import make_docs


@pytest.fixture(scope="module")
def stdlib_slice():
    c = StdlibCorpus(max_documents=60)
    return list(c.texts(range(len(c))))


def test_training_is_byte_identical(stdlib_slice):
    a = train_tokenizer(stdlib_slice, 800).to_str()
    b = train_tokenizer(iter(stdlib_slice), 800).to_str()
    assert a == b
    assert json.loads(a)["model"]["type"] == "BPE"


def test_special_tokens_have_stable_ids(stdlib_slice):
    tok = train_tokenizer(stdlib_slice, 600)
    ids = special_ids(tok)
    assert (ids.eot, ids.mask, ids.pad) == (0, 1, 2)
    assert tok.get_vocab_size() == 600
    # every byte is representable and text round-trips through the byte-level decoder
    text = stdlib_slice[3] + " ünïcödé ✓ \x00\x7f"
    assert tok.decode(tok.encode(text).ids) == text


def test_cache_reuses_and_keys_on_content(tmp_path):
    docs = make_docs(30)
    p1 = cached_tokenizer(tmp_path, "hash-a", 300, docs)
    mtime = p1.stat().st_mtime_ns
    p2 = cached_tokenizer(tmp_path, "hash-a", 300, iter(()))  # cached: texts are not read
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime
    assert cached_tokenizer(tmp_path, "hash-b", 300, docs) != p1
    assert cached_tokenizer(tmp_path, "hash-a", 310, docs) != p1


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": ')
    with pytest.raises(DataError, match="cannot be loaded") as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)


def test_foreign_tokenizer_gets_missing_specials(tmp_path):
    from tokenizers import pre_tokenizers, trainers

    from kiln.data.tokenizer import new_bpe

    tok = new_bpe()  # made elsewhere: knows EOT but neither MASK nor PAD
    tok.train_from_iterator(make_docs(30), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = tmp_path / "foreign.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    ids = special_ids(loaded)
    assert (ids.eot, ids.mask, ids.pad) == (0, 300, 301)
    assert loaded.get_vocab_size() == 302
