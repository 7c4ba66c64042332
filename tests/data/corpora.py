"""Tiny corpora built on the fly for the data tests (no downloads)."""

import json
import random

WORDS = ("alpha beta gamma delta epsilon kiln token data loader shard epoch seed batch "
         "def return import class self lambda yield while for if else").split()


def make_docs(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """n small pseudo-random documents (some very short, one with unicode)."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]
    docs[0] = "héllo wörld ✓ " + docs[0]
    return docs


def write_txt(dir_, docs) -> str:
    """One .txt file per document; returns a glob matching them."""
    dir_.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (dir_ / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
    return str(dir_ / "*.txt")


def write_jsonl(path, docs, field="text") -> str:
    """All documents as one .jsonl file; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)
