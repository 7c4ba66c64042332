"""Synthetic key-value needles: one line binding a fresh identifier to a random number, inserted
into a real document, and a query for it at the end.

    ...document text...
    needle kv_qhzwtr = 4817
    ...document text...
    needle kv_qhzwtr = 4817

The query repeats the needle line up to the value, so retrieval is copying what followed the
same words earlier (what induction heads do). The same format serves two users:
`data.synthetic_needles` mixes such documents into the training stream (NeedleCorpus, built by `kiln prepare`, so every objective sees identical data),
and kiln.infer.tasks.kv_retrieval asks a trained model to complete the query. The identifier and
the value are each preceded by a space in both lines, so the byte-level BPE cuts them into the
same tokens at the needle and at the query (its pre-tokeniser splits before a space + word or
space + number), and a model can learn to copy them.
"""
import string
from typing import Iterator, Sequence

import numpy as np

from .sources import Corpus

VALUE_DIGITS = 4
NEEDLE_CHARS = 48  # the needle line and the query, about
# the needle seed: fixed, so a recipe's data (and its cache key) depend only on the fraction
NEEDLE_SEED = 20250215


def random_needle(rng: np.random.Generator) -> tuple[str, str]:
    """(key, value): `kv_` + 6 random lowercase letters, and a VALUE_DIGITS-digit number."""
    key = "kv_" + "".join(rng.choice(list(string.ascii_lowercase), 6))
    value = str(int(rng.integers(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS)))
    return key, value


def needle_line(key: str, value: str) -> str:
    return f"\nneedle {key} = {value}\n"


def query_text(key: str) -> str:
    """The query's text up to the value; the answer is `answer_text(value)`."""
    return f"\nneedle {key} ="


def answer_text(value: str) -> str:
    return f" {value}"


def insert_at(text: str, depth: float, line: str) -> str:
    """`line` inserted into `text` at the line break nearest to `depth` (0 = start, 1 = end)."""
    at = int(round(depth * len(text)))
    cut = text.rfind("\n", 0, at + 1) if at < len(text) else len(text)
    cut = 0 if cut < 0 else cut
    return text[:cut] + line + text[cut:]


def needle_document(host: str, rng: np.random.Generator, max_chars: int) -> str:
    """A training document: a random slice (at most `max_chars`) of `host` with a needle at a
    random depth, then the query and its answer."""
    if len(host) > max_chars:
        start = int(rng.integers(0, len(host) - max_chars + 1))
        host = host[start:start + max_chars]
    key, value = random_needle(rng)
    depth = float(rng.random())
    return insert_at(host, depth, needle_line(key, value)) + query_text(key) + answer_text(value) + "\n"


class NeedleCorpus(Corpus):
    """`base` with needle documents making up about `fraction` of the training split's text (in
    characters, a proxy for tokens: documents differ in length by orders of magnitude, so a share
    of documents would say little about how often a model meets a needle). Each needle document
    sits right after the training document it was cut from; `train_idx` / `valid_idx` give the new
    indices of the splits (needle documents are training documents; the held-out split is unchanged).

    Deterministic from (base texts, fraction, max_chars): the needle seed is fixed."""

    def __init__(self, base: Corpus, train_idx: np.ndarray, valid_idx: np.ndarray, fraction: float,
                 max_chars: int):
        rng = np.random.default_rng([NEEDLE_SEED, int(round(fraction * 1e6)), max_chars])
        lengths = np.array([len(t) for t in base.texts(train_idx.tolist())], dtype=np.float64)
        want = fraction / (1 - fraction) * lengths.sum()  # characters of needle documents
        drawn, chars = [], 0.0
        while chars < want:  # hosts drawn by length, so long documents host their share
            pick = rng.choice(len(train_idx), size=1024, p=lengths / lengths.sum())
            drawn.append(pick)
            chars += float((np.minimum(lengths[pick], max_chars) + NEEDLE_CHARS).sum())
        pick = np.concatenate(drawn) if drawn else np.zeros(0, np.int64)
        cum = np.cumsum(np.minimum(lengths[pick], max_chars) + NEEDLE_CHARS)
        pick = pick[:int(np.searchsorted(cum, want)) + 1] if want > 0 else pick[:0]
        hosts = np.sort(train_idx[pick])
        n = len(hosts)
        host_texts = dict(zip(np.unique(hosts).tolist(), base.texts(np.unique(hosts).tolist())))
        needles = [needle_document(host_texts[h], rng, max_chars) for h in hosts.tolist()]
        # order: every base document, each followed by the needles cut from it
        self.order: list[tuple[bool, int]] = []  # (is_needle, index in base or in needles)
        k = 0
        for i in range(len(base)):
            self.order.append((False, i))
            while k < n and hosts[k] == i:
                self.order.append((True, k))
                k += 1
        self.base, self.needles = base, needles
        self.name = f"{base.name}+needles:{fraction}"
        self.keys = [f"needle/{j}" if is_n else base.keys[j] for is_n, j in self.order]
        new_of_base = {j: p for p, (is_n, j) in enumerate(self.order) if not is_n}
        is_valid = set(valid_idx.tolist())
        self.valid_idx = np.array([new_of_base[j] for j in valid_idx.tolist()], dtype=np.int64)
        self.train_idx = np.array([p for p, (is_n, j) in enumerate(self.order) if is_n or j not in is_valid],
                                  dtype=np.int64)

    def texts(self, indices: Sequence[int]) -> Iterator[str]:
        picked = [self.order[p] for p in indices]
        base_texts = self.base.texts([j for is_n, j in picked if not is_n])
        for is_n, j in picked:
            yield self.needles[j] if is_n else next(base_texts)
