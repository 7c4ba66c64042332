"""probe: what does a frozen encoder know? A linear probe on its mean-pooled features.

The task is built from the embedded corpus (the standard library, kiln.data.sources.StdlibCorpus):
which top-level package (asyncio, email, tkinter, ...) does a snippet of code come from? Each
class's files are split into probe-training and held-out files by a seeded permutation, so a
held-out snippet comes from a file the probe never saw. Snippets are `length`-token windows at
random offsets of random files of their class, the same number per class (so chance is
1 / classes, and a constant model scores it exactly).

Features are the model's final hidden states averaged over the snippet's tokens, no gradient.
The probe is multinomial logistic regression on the standardised features (full-batch L-BFGS
with a small L2 penalty, in float64: deterministic), scored by held-out accuracy.

The model is anything with kiln.model.Transformer's call: model(input_ids [B, S]) -> hidden [B, S, D].
"""
import numpy as np
import torch

from kiln.data.sources import StdlibCorpus
from kiln.infer.errors import InferError

# the standard library's largest top-level packages, the test suite left out (its files test the
# other packages, so its snippets name them); the first `classes` present are the labels
PACKAGES = ("idlelib", "encodings", "lib2to3", "distutils", "ctypes", "unittest", "asyncio", "tkinter",
            "email", "importlib", "multiprocessing", "xml")
HELDOUT_FILES = 0.25  # share of each class's files kept for the held-out snippets


def package_files(corpus, classes: int) -> dict[str, list[str]]:
    """{package: its .py files (corpus keys)} for the first `classes` of PACKAGES in the corpus."""
    by_pkg: dict[str, list[str]] = {}
    for key in corpus.keys:
        top = key.split("/", 1)[0]
        if "/" in key and top in PACKAGES:
            by_pkg.setdefault(top, []).append(key)
    names = [p for p in PACKAGES if len(by_pkg.get(p, [])) >= 4][:classes]
    if len(names) < 2:
        raise InferError(f"the standard library at {corpus.root} has too few packages for the probe "
                         f"(found {names}): use a Python installed with its standard library sources")
    return {p: by_pkg[p] for p in names}


def split_files(keys: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(held-out files, probe-training files) of one package: HELDOUT_FILES of `keys` (at least
    one) by a permutation seeded by (seed, the package's file count)."""
    keys = [keys[i] for i in np.random.default_rng([seed, len(keys)]).permutation(len(keys))]
    cut = max(1, round(len(keys) * HELDOUT_FILES))
    return keys[:cut], keys[cut:]


def stdlib_snippets(tok, length: int, per_class: int, classes: int = 8, seed: int = 0, root=None) -> dict:
    """The probe's data: {"train": (ids [N, length], labels [N]), "heldout": (...), "classes": names};
    `per_class` training snippets per class and half as many held-out ones (see the module doc)."""
    corpus = StdlibCorpus(root)
    files = package_files(corpus, classes)
    rng = np.random.default_rng([seed, length, per_class])
    out = {"classes": list(files), "train": ([], []), "heldout": ([], [])}
    encoded: dict[str, list[int]] = {}  # files are tokenised when first drawn (a few per class)

    def tokens(key):
        if key not in encoded:
            encoded[key] = tok.encode((corpus.root / key).read_text(encoding="utf-8", errors="replace")).ids
        return encoded[key]

    for label, (pkg, keys) in enumerate(files.items()):
        heldout, train = split_files(keys, seed)
        for split, chosen, n in (("heldout", heldout, max(1, per_class // 2)), ("train", train, per_class)):
            short: set[str] = set()
            got = 0
            while got < n:
                usable = [k for k in chosen if k not in short]
                if not usable:
                    raise InferError(f"no {split} file of {pkg} holds {length} tokens: choose a shorter --snippet-len")
                key = usable[int(rng.integers(len(usable)))]
                d = tokens(key)
                if len(d) < length:
                    short.add(key)
                    continue
                start = int(rng.integers(0, len(d) - length + 1))
                out[split][0].append(d[start:start + length])
                out[split][1].append(label)
                got += 1
    for split in ("train", "heldout"):
        ids, labels = out[split]
        out[split] = (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))
    return out


def features(model, ids: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """[N, D] float64: the model's final hidden states of each row, averaged over its tokens."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            parts = [model(ids[i:i + batch]).double().mean(1) for i in range(0, len(ids), batch)]
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return torch.cat(parts)


def linear_probe(train_x, train_y, test_x, test_y, classes: int, l2: float = 1e-3, iters: int = 200) -> dict:
    """Fit logistic regression on (train_x, train_y), score it on both splits."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-8)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(a.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, train_y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = lambda x, y: float(((x @ w + bias).argmax(-1) == y).double().mean())  # noqa: E731
        return {"accuracy": acc(b, test_y), "train_accuracy": acc(a, train_y)}


def probe(model, data: dict) -> dict:
    """Held-out accuracy of a linear probe on `model`'s features of `data` (stdlib_snippets)."""
    (tx, ty), (hx, hy) = data["train"], data["heldout"]
    k = len(data["classes"])
    res = linear_probe(features(model, tx), ty, features(model, hx), hy, k)
    return {"task": "probe", **res, "chance": 1.0 / k, "classes": data["classes"],
            "train_snippets": len(ty), "heldout_snippets": len(hy), "snippet_len": int(tx.shape[1])}
