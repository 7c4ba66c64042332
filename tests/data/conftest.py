"""Fixtures for the data tests."""

import pytest

from kiln.data.config import DataConfig
from tests.data.corpora import make_docs, write_jsonl


@pytest.fixture
def small_cfg(tmp_path):
    """A DataConfig over 40 small .jsonl documents, tiny vocab and seq_len, cache in tmp_path."""
    src = write_jsonl(tmp_path / "src" / "docs.jsonl", make_docs(40))
    return DataConfig(source=src, vocab_size=300, seq_len=8, heldout_percent=10.0,
                      cache_dir=str(tmp_path / "cache"), num_workers=0)
