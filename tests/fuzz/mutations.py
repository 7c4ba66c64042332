"""Seeded hostile inputs: mutated recipes and overrides, corpora and prepared token files.

Every generator takes a random.Random, so a seed fixes the cases; the test draws a bounded number,
bench/fuzz.py many more. Each case is (name, kind, payload): kind is the input class the report
counts (see tests/fuzz/hostile.py for the outcome classes).
"""
import random
from pathlib import Path

import yaml

# A valid small recipe: every mutation starts from it. CACHE and RUNS are filled in per run.
BASE = {
    "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
    "data": {"source": "stdlib", "vocab_size": 512, "seq_len": 64, "max_documents": 60, "cache_dir": "CACHE"},
    "train": {"steps": 4, "micro_batch": 4, "nproc": 1, "log_every": 1, "eval_every": 0, "eval_batches": 1,
              "run_root": "RUNS"},
    "logging": {"wandb": {"mode": "disabled"}},
    "checkpoint": {"every": 2},
}

WRONG_TYPES = ["abc", [1, 2], {"a": 1}, True, False, 1.5, None, "", "1e400", "0x10", [], {}]
NEGATIVE = [-1, -2, -10**9, -0.5, -1e-9, 0]
HUGE = [10**12, 2**31, 2**63, 10**100, 1e308, float("inf"), float("nan"), 10**6]
UNICODE = ["módel", "日本語", "\u202eevil", "💥", "a\u200bb", "nul\x00byte", "ｍｏｄｅｌ", "e\u0301"]

# Whole files whose structure is hostile (tab indents, duplicates, aliases, interpolation, tags).
STRUCTURAL = {
    "empty": "",
    "blank": "   \n\n",
    "top-level list": "[1, 2, 3]\n",
    "top-level scalar": "42\n",
    "section is a list": "model: [1, 2]\n",
    "section is a scalar": "model: 5\n",
    "tab indent": "model:\n\tdim: 64\n",
    "duplicate key": "model: {dim: 64}\nmodel: {dim: 96}\n",
    "duplicate nested key": "model:\n  dim: 64\n  dim: 96\n",
    "unclosed flow": "model: {dim: 64\n",
    "mapping in scalar": "a: b: c\n",
    "bad indentation": "model:\n  dim: 64\n   n_layers: 2\n",
    "unknown interpolation": "train: {name: '${nowhere.at_all}'}\n",
    "self interpolation": "train: {name: '${train.name}'}\n",
    "interpolation loop": "train: {name: '${model.x}'}\nmodel: {x: '${train.name}'}\n",
    "env resolver": "train: {name: '${oc.env:HOME}'}\n",
    "unknown resolver": "train: {name: '${nope:1}'}\n",
    "self alias": "a: &a [*a]\n",
    "merge key anchors": "common: &c {dim: 64}\nmodel: {<<: *c, n_layers: 2}\n",
    "anchor reused valid": "model: &m {dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2}\n",
    "python tag": "model: !!python/object/apply:os.system ['touch PAYLOAD']\n",
    "python name tag": "model: !!python/name:os.system\n",
    "custom tag": "model: !kiln {dim: 64}\n",
    "deep nesting": "a: " + "[" * 3000 + "]" * 3000 + "\n",
    "long line": "train: {name: " + "x" * 300_000 + "}\n",
    "too large": "# " + "pad " * 300_000 + "\nmodel: {dim: 64}\n",
    "many keys": "".join(f"k{i}: {i}\n" for i in range(5000)),
    "null section": "model: null\n",
    "null value": "model: {dim: null}\n",
    "unicode key": "mödel: {dim: 64}\n",
    "bom": "\ufeffmodel: {dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2}\n",
    "crlf": "model: {dim: 64}\r\ntrain: {steps: 4}\r\n",
    "document separator": "model: {dim: 64}\n---\ntrain: {steps: 4}\n",
}

# Raw bytes that are not UTF-8 text at all.
BINARY = {"latin-1": "model: {dim: 64}\n# caf\xe9\n".encode("latin-1"), "nul bytes": b"\x00\x01\x02model",
          "utf-16": "model: {dim: 64}\n".encode("utf-16"), "random bytes": bytes(range(256)) * 4}

OVERRIDES = ["foo", "=1", "a..b=1", ".x=1", "train.steps=[", "train.steps=&a [*a]", "model=3",
             "train.steps.x=1", "train.steps=1e999", "train.steps=", "train.stpes=5", "Train.steps=5",
             "train.steps=five", "train.steps=-5", "model.dim=0", "data.seq_len=2147483648",
             "train.name=../escape", "train.name=/abs", "train.name=.", "train.name=a/b",
             "deepspeed.train_batch_size=7", "deepspeed.train_batch_size=16", "deepspeed.gradient_accumulation_steps=x",
             "model.dim=100000", "model.n_layers=100000", "train.micro_batch=1000000000",
             "data.vocab_size=99999999999", "train.steps=9" * 50]


def billion_laughs(depth: int, width: int) -> str:
    """A YAML alias bomb: `depth` levels, each a list of `width` references to the one below."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, depth + 1):
        refs = ", ".join([f"*l{i - 1}"] * width)
        lines.append(f"l{i}: &l{i} [{refs}]")
    lines.append(f"model: {{dim: 64, junk: *l{depth}}}")
    return "\n".join(lines) + "\n"


def _leaf_keys() -> list:
    from kiln.trainer.config import reference_rows

    return [k for k, *_ in reference_rows()]


def _typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(len(word))
    op = rng.choice(["drop", "swap", "double", "case", "neighbour"])
    if op == "drop" and len(word) > 1:
        return word[:i] + word[i + 1:]
    if op == "swap" and len(word) > 1:
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "double":
        return word[:i] + word[i] + word[i:]
    if op == "case":
        return word[:i] + word[i].swapcase() + word[i + 1:]
    return word[:i] + chr(ord(word[i]) + 1) + word[i + 1:]


def _set(values: dict, dotted: str, value) -> dict:
    node = values
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return values


def _dump(values: dict) -> str:
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def base(cache: Path, runs: Path) -> dict:
    """A fresh copy of BASE with its folders filled in."""
    out = yaml.safe_load(yaml.safe_dump(BASE))
    out["data"]["cache_dir"], out["train"]["run_root"] = str(cache), str(runs)
    return out


def recipe_cases(rng: random.Random, n: int, cache: Path, runs: Path) -> list:
    """n mutated recipes (name, kind, text or bytes), drawn from every class, plus the fixed hostile files
    (STRUCTURAL, BINARY, alias bombs) once each."""
    keys = _leaf_keys()
    cases = [(f"structural: {k}", "recipe/structure", v) for k, v in STRUCTURAL.items()]
    cases += [(f"binary: {k}", "recipe/not-utf8", v) for k, v in BINARY.items()]
    cases += [(f"billion laughs {d}x{w}", "recipe/alias-bomb", billion_laughs(d, w)) for d, w in ((9, 9), (6, 20))]
    kinds = ["typo-key", "typo-section", "wrong-type", "negative", "huge", "unicode", "anchor", "alias-bomb"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        values, key = base(cache, runs), rng.choice(keys)
        if kind == "typo-key":
            section, _, leaf = key.rpartition(".")
            _set(values, f"{section}.{_typo(rng, leaf)}" if section else _typo(rng, leaf), 1)
            text, name = _dump(values), f"typo of {key}"
        elif kind == "typo-section":
            section = rng.choice(list(values))
            values[_typo(rng, section)] = values.pop(section)
            text, name = _dump(values), f"typo of section {section}"
        elif kind == "anchor":  # model.dim's value anchored, and the alias put where its type may be wrong
            _set(values, key, "ALIAS_OF_DIM")
            text = _dump(values).replace("dim: 64", "dim: &d 64", 1).replace("ALIAS_OF_DIM", "*d")
            name = f"anchor of model.dim into {key}"
        elif kind == "alias-bomb":
            d, w = rng.randint(4, 12), rng.randint(4, 12)
            text, name = billion_laughs(d, w), f"alias bomb {d}x{w}"
        else:
            pool = {"wrong-type": WRONG_TYPES, "negative": NEGATIVE, "huge": HUGE, "unicode": UNICODE}[kind]
            value = rng.choice(pool)
            _set(values, key, value)
            text, name = _dump(values), f"{key}={value!r}"[:120]
        cases.append((name, f"recipe/{kind}", text))
    return cases


def override_cases(rng: random.Random, n: int) -> list:
    """--set mutations: the fixed hostile list, then n random keys with hostile values."""
    keys = _leaf_keys()
    cases = [(f"--set {o[:60]}", "override", [o]) for o in OVERRIDES]
    for _ in range(n):
        key = rng.choice(keys)
        value = rng.choice(WRONG_TYPES + NEGATIVE + HUGE + UNICODE)
        raw = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        cases.append((f"--set {key}={raw[:40]}", "override", [f"{key}={raw}"]))
    return cases


def flip_bits(rng: random.Random, path: Path, count: int = 1) -> str:
    """Flip `count` random bits of a file in place; a short description."""
    data = bytearray(path.read_bytes())
    spots = [rng.randrange(len(data) * 8) for _ in range(count)]
    for s in spots:
        data[s // 8] ^= 1 << (s % 8)
    path.write_bytes(bytes(data))
    return f"{count} bit(s) of {path.name} at byte {spots[0] // 8}"


def truncate(rng: random.Random, path: Path) -> str:
    """Cut a file at a random length (possibly 0); a short description."""
    size = path.stat().st_size
    keep = rng.choice([0, 1, size // 2, max(0, size - 1), rng.randrange(size)])
    with open(path, "r+b") as f:
        f.truncate(keep)
    return f"{path.name} cut to {keep} of {size} bytes"


def corpus_cases() -> list:
    """Corpus folders to build (name, kind, {file name: bytes}), each one hostile way."""
    good = {f"doc{i}.txt": (f"Document {i} says something plain about kilns and firing clay. " * 30).encode()
            for i in range(40)}
    return [
        ("empty folder", "corpus/empty", {}),
        ("only a 0-byte file", "corpus/zero-byte", {"a.txt": b""}),
        ("0-byte .jsonl", "corpus/zero-byte", {"a.jsonl": b""}),
        ("a 0-byte file among good ones", "corpus/zero-byte", {**good, "empty.txt": b""}),
        ("blank documents only", "corpus/empty", {"a.txt": b"\n\n  \n", "b.txt": b"   "}),
        ("an empty document among good ones", "corpus/empty", {**good, "blank.txt": b"\n \n"}),
        ("non-UTF-8 text", "corpus/not-utf8", {"bad.txt": b"caf\xe9 \xff\xfe" * 50}),
        ("non-UTF-8 among good ones", "corpus/not-utf8", {**good, "bad.txt": b"ok then \xff\xfe\xfd" * 20}),
        ("non-UTF-8 .jsonl", "corpus/not-utf8", {"a.jsonl": b'{"text": "caf\xe9"}\n'}),
        ("broken .jsonl", "corpus/malformed", {"a.jsonl": b'{"text": "a"}\n{"text": \n'}),
        (".jsonl without the text field", "corpus/malformed", {"a.jsonl": b'{"body": "a"}\n' * 5}),
        (".jsonl of empty texts", "corpus/empty", {"a.jsonl": b'{"text": ""}\n' * 5}),
        ("garbage .parquet", "corpus/malformed", {"a.parquet": b"PAR1 not really" * 10}),
        ("too little text", "corpus/too-small", {"a.txt": b"hi", "b.txt": b"yo"}),
    ]
