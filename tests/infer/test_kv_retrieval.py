"""kv_retrieval on hand-built models with known answers: a perfect copier scores 1.0, a copier that
sees only the last few tokens finds exactly the needles near the query, a constant model scores
chance; and the cases are what the module says (length, depth, the needle format)."""
import numpy as np
import pytest
import torch

from kiln.data.needles import answer_text, needle_line, query_text
from kiln.data.tokenizer import load_tokenizer, special_ids, train_tokenizer, write_atomic
from kiln.infer.errors import InferError
from kiln.infer.tasks.kv_retrieval import CHANCE, filler_stream, kv_retrieval, make_case
from tests.data.corpora import make_docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(tokenizer, held-out token stream with EOTs, eot id) from small on-the-fly documents."""
    words = [d.split(" ") for d in make_docs(80, max_words=60)]
    docs = ["\n".join(" ".join(w[i:i + 6]) for i in range(0, len(w), 6)) for w in words]  # lines to cut at
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    write_atomic(path, train_tokenizer(docs, 400).to_str().encode())
    tok = load_tokenizer(path)
    eot = special_ids(tok).eot
    tokens = np.concatenate([np.array(tok.encode(d).ids + [eot]) for d in docs])
    return tok, tokens, eot


class Copier:
    """An induction head in closed form: at each position, find the latest earlier position whose
    preceding tokens match the longest suffix of the current ones (within `lookback`) and predict
    the token that followed it. It copies perfectly what followed the query's words before."""

    def __init__(self, vocab: int, lookback: int = 10**9):
        self.vocab, self.lookback = vocab, lookback

    def __call__(self, ids):
        return ids

    def logits(self, ids):
        out = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                best, best_len = None, 0
                for j in range(max(0, t - self.lookback), t):
                    n = 0
                    while n <= j and row[j - n] == row[t - n]:
                        n += 1
                    if n >= best_len and n > 0:
                        best, best_len = j, n
                if best is not None:
                    out[b, t, row[best + 1]] = 1.0
        return out


class Constant:
    """The same logits everywhere: its argmax is always `token`."""

    def __init__(self, vocab: int, token: int):
        self.vec = torch.zeros(vocab)
        self.vec[token] = 1.0

    def __call__(self, ids):
        return ids

    def logits(self, ids):
        return self.vec.expand(*ids.shape, -1)


def test_cases_have_the_length_the_needle_at_its_depth_and_the_query_at_the_end(corpus):
    tok, tokens, eot = corpus
    stream = filler_stream(tokens, eot)
    assert eot not in stream.tolist()
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = make_case(tok, stream, 160, depth, np.random.default_rng(1))
        assert 150 <= len(prompt) + len(answer) <= 160
        text = tok.decode(prompt)
        key = text.rsplit("needle ", 1)[1].split(" ")[0]
        value = tok.decode(answer).strip()
        assert text.endswith(query_text(key)) and answer == tok.encode(answer_text(value)).ids
        at = text.index(needle_line(key, value)) / (len(text) - len(query_text(key)))
        assert abs(at - depth) < 0.15, (depth, at)  # at a line break near the depth


def test_a_perfect_copier_scores_one_and_a_short_sighted_one_only_finds_near_needles(corpus):
    tok, tokens, eot = corpus
    vocab = tok.get_vocab_size()
    res = kv_retrieval(Copier(vocab), tok, tokens, eot, [96, 160], [0.0, 0.5, 1.0], samples=4)
    assert res["grid"] == [[1.0] * 3] * 2 and res["accuracy"] == 1.0 and res["token_accuracy"] == 1.0
    near = kv_retrieval(Copier(vocab, lookback=60), tok, tokens, eot, [160], [0.0, 1.0], samples=4)
    assert near["grid"] == [[0.0, 1.0]]  # the needle 130 tokens back is out of its sight


def test_a_constant_model_scores_chance(corpus):
    tok, tokens, eot = corpus
    digit = tok.token_to_id("7")
    res = kv_retrieval(Constant(tok.get_vocab_size(), digit), tok, tokens, eot, [96], [0.0, 0.5, 1.0], samples=20)
    # 60 cases at chance 1/9000: more than 0 hits would be a 1-in-150 event
    assert res["accuracy"] == 0.0 and res["chance"] == CHANCE
    # its token accuracy is exactly the share of answer tokens that are "7"
    stream, hits, total = filler_stream(tokens, eot), 0, 0
    for di, depth in enumerate([0.0, 0.5, 1.0]):
        rng = np.random.default_rng([0, 0, di, 96])
        for _ in range(20):
            _, answer = make_case(tok, stream, 96, depth, rng)
            hits, total = hits + answer.count(digit), total + len(answer)
    assert res["token_accuracy"] == pytest.approx(hits / total) and 0 < hits / total < 0.3


def test_impossible_grids_are_one_line_errors(corpus):
    tok, tokens, eot = corpus
    with pytest.raises(InferError, match="too short: the needle, query and answer take"):
        kv_retrieval(Constant(tok.get_vocab_size(), 0), tok, tokens, eot, [20], [0.5])
    with pytest.raises(InferError, match="depths in"):
        kv_retrieval(Constant(tok.get_vocab_size(), 0), tok, tokens, eot, [96], [1.5])
