"""kv_retrieval: can the model recall a key-value needle hidden in real text?

Each case is a window of held-out tokens (the run's own held-out documents, EOTs dropped so it
reads as one document) decoded to text, with a needle line (kiln.data.needles) inserted at a line
break at a controlled depth (0 = start, 1 = just before the query), and the query at the end:
the needle line repeated up to its value. The whole case is about `length` tokens.

Scoring is greedy decoding of the value, computed teacher-forced in one forward per grid cell:
a case counts as retrieved when the argmax at every answer position is the answer's token
(exactly what greedy decoding of len(answer) tokens would produce). token_accuracy is the
fraction of answer tokens whose argmax is right (partial credit for small models). Chance for
the exact match is 1 / 9000 (a 4-digit value).

The model is anything with kiln.model.Transformer's protocol: model(input_ids) -> hidden,
model.logits(hidden) -> [B, S, V].
"""
import numpy as np
import torch

from kiln.data.needles import VALUE_DIGITS, answer_text, insert_at, needle_line, query_text, random_needle
from kiln.infer.errors import InferError

CHANCE = 1.0 / (9 * 10 ** (VALUE_DIGITS - 1))
MIN_FILLER = 16  # tokens of real text at least, or depth means nothing


def filler_stream(tokens: np.ndarray, eot: int) -> np.ndarray:
    """The held-out token stream without EOTs (the documents run on as one text)."""
    tokens = np.asarray(tokens)
    return tokens[tokens != eot]


def make_case(tok, stream: np.ndarray, length: int, depth: float, rng: np.random.Generator):
    """(prompt ids, answer ids) of one case of about `length` tokens (see the module doc)."""
    key, value = random_needle(rng)
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    answer = enc(answer_text(value))
    budget = length - len(enc(needle_line(key, value))) - len(enc(query_text(key))) - len(answer)
    for _ in range(6):  # decoding and re-encoding shifts token borders a little: shrink to fit
        if budget < MIN_FILLER:
            raise InferError(f"kv_retrieval length {length} is too short: the needle, query and answer take "
                             f"{length - budget} tokens; choose lengths of at least {length - budget + MIN_FILLER}")
        if budget > len(stream):
            raise InferError(f"kv_retrieval length {length} does not fit in the held-out split's "
                             f"{len(stream)} tokens: choose shorter lengths or raise data.heldout_percent")
        start = int(rng.integers(0, len(stream) - budget + 1))
        filler = tok.decode(stream[start:start + budget].tolist())
        prompt = enc(insert_at(filler, depth, needle_line(key, value)) + query_text(key))
        over = len(prompt) + len(answer) - length
        if over <= 0:
            return prompt, answer
        budget -= over
    return prompt, answer


def score_cases(model, cases, pad: int) -> tuple[int, int, int]:
    """(exactly retrieved cases, right answer tokens, answer tokens) over `cases`, one forward."""
    rows = [p + a[:-1] for p, a in cases]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # right padding: causal, never seen
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    with torch.no_grad():
        pred = model.logits(model(ids)).argmax(-1)
    exact = right = total = 0
    for i, (p, a) in enumerate(cases):
        got = pred[i, len(p) - 1:len(p) - 1 + len(a)].tolist()
        hits = sum(g == t for g, t in zip(got, a))
        exact += hits == len(a)
        right, total = right + hits, total + len(a)
    return exact, right, total


def kv_retrieval(model, tok, tokens: np.ndarray, eot: int, lengths, depths, samples: int = 20,
                 seed: int = 0) -> dict:
    """Accuracy over the grid lengths x depths, `samples` cases per cell (deterministic from
    `seed`): {"grid": [[acc per depth] per length], "token_grid", "accuracy" (mean), ...}."""
    if samples < 1 or not lengths or not depths or any(not 0 <= d <= 1 for d in depths):
        raise InferError(f"kv_retrieval needs samples >= 1, lengths and depths in [0, 1] (got samples={samples}, "
                         f"lengths={list(lengths)}, depths={list(depths)})")
    stream = filler_stream(tokens, eot)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    grid, token_grid = [], []
    try:
        for li, length in enumerate(lengths):
            row, trow = [], []
            for di, depth in enumerate(depths):
                rng = np.random.default_rng([seed, li, di, int(length)])
                cases = [make_case(tok, stream, int(length), float(depth), rng) for _ in range(samples)]
                exact, right, total = score_cases(model, cases, eot)
                row.append(exact / samples)
                trow.append(right / total)
            grid.append(row)
            token_grid.append(trow)
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return {"task": "kv_retrieval", "lengths": [int(x) for x in lengths], "depths": [float(d) for d in depths],
            "samples": samples, "grid": grid, "token_grid": token_grid,
            "accuracy": float(np.mean(grid)), "token_accuracy": float(np.mean(token_grid)), "chance": CHANCE}


def format_grid(result: dict, key: str = "grid") -> str:
    """The grid as a small text table (rows: lengths, columns: depths)."""
    head = "length \\ depth " + " ".join(f"{d:>6.2f}" for d in result["depths"])
    lines = [head] + [f"{n:>14} " + " ".join(f"{v:>6.2f}" for v in row)
                      for n, row in zip(result["lengths"], result[key])]
    return "\n".join(lines)
