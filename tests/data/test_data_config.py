"""DataConfig: defaults validate, impossible values name themselves (ranges through the recipe's
one validation place, check_section)."""

import dataclasses

import pytest

from kiln.data.config import DataConfig
from kiln.trainer.config import ConfigError, check_section


def test_defaults_validate_and_fields_have_help():
    DataConfig().validate()
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f.name
    assert DataConfig.__dataclass_fields__["packing"].metadata["choices"] == ["concat", "decompose"]


@pytest.mark.parametrize("change, word", [
    ({"vocab_size": 100}, "vocab_size"), ({"seq_len": 0}, "seq_len"),
    ({"heldout_percent": 0.0}, "heldout_percent"), ({"heldout_percent": 100.0}, "heldout_percent"),
    ({"max_documents": -1}, "max_documents"), ({"packing": "pack"}, "packing"),
    ({"source": ""}, "source"), ({"source": "hf:"}, "hf:"), ({"num_workers": -1}, "num_workers"),
    ({"cache_dir": ""}, "cache_dir"), ({"text_field": ""}, "text_field"),
])
def test_impossible_values_raise_one_line(change, word):
    with pytest.raises(ConfigError, match=word) as e:
        check_section(DataConfig(**change), "data")
    assert "\n" not in str(e.value)


def test_vocab_size_ignored_with_given_tokenizer():
    DataConfig(tokenizer="tok.json", vocab_size=1).validate()
