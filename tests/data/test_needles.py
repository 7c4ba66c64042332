"""data.synthetic_needles: needle documents mixed into the training split only, deterministically,
with the tokenizer and the held-out split of the needle-free data."""
import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np

from kiln.data.indexed import open_indexed
from kiln.data.needles import insert_at, needle_document
from kiln.data.prepare import prepare


def docs_of(prepared, split="train"):
    tok = prepared.tokenizer()
    tokens, starts, ends = open_indexed(getattr(prepared, f"{split}_prefix"))
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def digest(prepared) -> str:
    return hashlib.sha256(Path(prepared.train_prefix + ".bin").read_bytes()).hexdigest()


def test_needles_join_the_training_split_only_and_the_same_way_every_time(small_cfg, tmp_path):
    plain = prepare(small_cfg, progress=False)
    cfg = dataclasses.replace(small_cfg, synthetic_needles=0.25)
    mixed = prepare(cfg, progress=False)
    assert mixed.dir != plain.dir
    assert Path(mixed.tokenizer_path).read_bytes() == Path(plain.tokenizer_path).read_bytes()
    assert docs_of(mixed, "valid") == docs_of(plain, "valid")
    train = docs_of(mixed)
    needles = [d for d in train if "needle kv_" in d]
    assert len(needles) == mixed.train_docs - plain.train_docs
    share = sum(map(len, needles)) / sum(map(len, train))
    assert abs(share - 0.25) < 0.02, share  # a quarter of the training text
    assert [d for d in train if "needle kv_" not in d] == docs_of(plain)  # real documents in order
    for d in needles:  # the query at the end repeats the needle line, value included
        (key, value), = set(re.findall(r"needle (kv_[a-z]{6}) = (\d{4})", d))
        assert d.endswith(f"\nneedle {key} = {value}\n") and d.count(f"needle {key} = {value}") == 2
        assert len(d) <= 2 * cfg.seq_len + 60
    again = prepare(dataclasses.replace(cfg, cache_dir=str(tmp_path / "other")), progress=False)
    assert digest(again) == digest(mixed)  # deterministic: a fresh cache builds the same tokens


def test_insert_at_cuts_at_the_line_break_nearest_below_the_depth():
    text = "aaaa\nbbbb\ncccc\n"
    assert insert_at(text, 0.0, "X") == "X" + text
    assert insert_at(text, 0.5, "X") == "aaaaX\nbbbb\ncccc\n"  # depth 7.5 of 15: the break at 4
    assert insert_at(text, 0.7, "X") == "aaaa\nbbbbX\ncccc\n"  # 10.5: the break at 9
    assert insert_at(text, 1.0, "X") == text + "X"
    d = needle_document("line\n" * 400, np.random.default_rng(0), 100)
    assert len(d) < 100 + 60 and d.count("needle kv_") == 2
