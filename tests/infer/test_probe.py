"""The probe on hand-built models with known answers: features that separate the classes score 1.0,
a constant model scores chance exactly; and the task's data is what the module says (balanced
classes, held-out snippets from files the probe never trains on)."""
import numpy as np
import pytest
import torch

from kiln.data.tokenizer import load_tokenizer, train_tokenizer, write_atomic
from kiln.infer.errors import InferError
from kiln.infer.tasks import probe as P


class Bag:
    """Features = the one-hot tokens (mean-pooled: a bag of tokens)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, ids):
        return torch.nn.functional.one_hot(ids, self.vocab).float()


class Constant:
    """The same hidden state whatever the input."""

    def __call__(self, ids):
        return torch.ones(*ids.shape, 8)


def hand_built(classes=4, per_class=20, heldout=10, seed=0):
    """Class c's rows are tokens drawn from its own block of 10 ids: separable by a bag of tokens."""
    rng = np.random.default_rng(seed)
    split = {}
    for name, n in (("train", per_class), ("heldout", heldout)):
        labels = np.repeat(np.arange(classes), n)
        ids = np.stack([rng.integers(10 * c, 10 * c + 10, 16) for c in labels])
        split[name] = (torch.tensor(ids), torch.tensor(labels))
    return {"classes": [f"pkg{c}" for c in range(classes)], **split}


def test_separable_features_score_one():
    res = P.probe(Bag(40), hand_built())
    assert res["accuracy"] == 1.0 and res["train_accuracy"] == 1.0
    assert res["chance"] == 0.25 and res["heldout_snippets"] == 40 and res["train_snippets"] == 80


def test_a_constant_model_scores_chance_exactly():
    res = P.probe(Constant(), hand_built(classes=5))
    assert res["accuracy"] == pytest.approx(0.2, abs=1e-12) and res["chance"] == 0.2


def test_labels_the_features_do_not_carry_score_near_chance():
    data = hand_built(classes=4, per_class=40, heldout=40)
    shuffled = torch.randperm(160, generator=torch.Generator().manual_seed(1))
    data["heldout"] = (data["heldout"][0], data["heldout"][1][shuffled])  # held-out labels unrelated to rows
    acc = P.probe(Bag(40), data)["accuracy"]
    assert abs(acc - 0.25) < 5 * (0.25 * 0.75 / 160) ** 0.5, acc


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from kiln.data.sources import StdlibCorpus

    corpus = StdlibCorpus()
    text = [(corpus.root / k).read_text(errors="replace") for k in corpus.keys[:40]]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    write_atomic(path, train_tokenizer(text, 300).to_str().encode())
    return load_tokenizer(path)


@pytest.mark.slow
def test_stdlib_snippets_are_balanced_and_held_out_by_file(tok):
    data = P.stdlib_snippets(tok, 32, per_class=6, classes=3, seed=4)
    assert data["classes"] == ["idlelib", "encodings", "lib2to3"]
    (tx, ty), (hx, hy) = data["train"], data["heldout"]
    assert tx.shape == (18, 32) and hx.shape == (9, 32)
    assert torch.bincount(ty).tolist() == [6, 6, 6] and torch.bincount(hy).tolist() == [3, 3, 3]
    again = P.stdlib_snippets(tok, 32, per_class=6, classes=3, seed=4)
    assert torch.equal(again["train"][0], tx) and torch.equal(again["heldout"][0], hx)  # deterministic
    corpus = P.StdlibCorpus()
    files = P.package_files(corpus, 3)
    for split, (ids, labels) in (("heldout", (hx, hy)), ("train", (tx, ty))):
        for row, label in zip(ids.tolist(), labels.tolist()):
            pkg = data["classes"][label]
            heldout, train = P.split_files(files[pkg], seed=4)
            assert not set(heldout) & set(train) and len(heldout) == round(len(files[pkg]) * P.HELDOUT_FILES)
            text = tok.decode(row)[2:-2]  # a window may cut a character at either end
            own = heldout if split == "heldout" else train
            hits = [k for k in own if text in (corpus.root / k).read_text(errors="replace")]
            assert hits, (split, pkg, text)  # every snippet is real text of its split's files


def test_too_long_snippets_are_one_line(tok):
    with pytest.raises(InferError, match="choose a shorter --snippet-len"):
        P.stdlib_snippets(tok, 10**7, per_class=2, classes=2)
