"""KV-cached decoding against recomputing the whole sequence through the model's own attention,
and the sampling rules, on tiny random models."""
import pytest
import torch

from kiln import kernels
from kiln.infer.errors import InferError
from kiln.infer.generate import Sampling, generate, next_token
from kiln.infer.kv_cache import KVCache
from tests.infer.conftest import VOCAB, prompts, tiny


@pytest.mark.parametrize("mlp", ["swiglu", "moe"])
def test_cached_greedy_equals_uncached(mlp):
    model = tiny(mlp)
    ps = prompts(6)
    assert len({len(p) for p in ps}) > 2  # a batch of different lengths: left padding is exercised
    cached = generate(model, ps, 12)
    assert cached == generate(model, ps, 12, cache=False)
    assert all(len(o) == 12 for o in cached)
    # one row alone and inside the padded batch decode the same tokens
    assert generate(model, ps[:1], 12) == cached[:1]


def test_cached_logits_match_the_full_forward():
    model = tiny()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        ref = model.logits(model(ids))
        kv = KVCache(model.cfg, 2, 10)
        got = []
        with kv.attached(model):
            for t in range(10):  # one token at a time
                pos = torch.full((2, 1), t)
                kv.feed(pos, torch.ones(2, 1, dtype=torch.bool))
                got.append(model.logits(model(ids[:, t:t + 1], position_ids=pos)))
                kv.advance()
    torch.testing.assert_close(torch.cat(got, 1), ref, rtol=1e-5, atol=1e-5)
    assert all(b.attn.attn_fn is kernels.attention for b in model.layers)  # restored after the block


def test_eot_stops_a_row_and_is_not_returned():
    model = tiny()
    ps = prompts(3)
    free = generate(model, ps, 8)
    eot = free[0][3]
    stopped = generate(model, ps, 8, eot=eot)
    assert stopped[0] == free[0][:free[0].index(eot)]
    for s, f in zip(stopped, free):
        assert s == (f[:f.index(eot)] if eot in f else f)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 200)
    g = torch.Generator().manual_seed(0)
    assert (next_token(logits, Sampling(temperature=1.0, top_k=1), g) == 1).all()      # top-1 = greedy
    assert (next_token(logits, Sampling(temperature=1.0, top_p=0.01), g) == 1).all()   # tiny mass = greedy
    two = next_token(logits, Sampling(temperature=1.0, top_k=2), g)
    assert set(two.tolist()) == {1, 3}                                                   # only the top 2
    p = torch.softmax(logits[0], -1)
    # top_p just above the top two's mass keeps a third token; just below keeps two
    three = next_token(logits, Sampling(temperature=1.0, top_p=float(p[1] + p[3]) + 1e-3), g)
    assert set(three.tolist()) == {1, 2, 3}
    assert set(next_token(logits, Sampling(temperature=1.0, top_p=float(p[1] + p[3]) - 1e-3), g).tolist()) == {1, 3}
    model = tiny()
    a = generate(model, prompts(2), 6, Sampling(temperature=1.0, seed=3))
    assert a == generate(model, prompts(2), 6, Sampling(temperature=1.0, seed=3))      # seeded
    assert a != generate(model, prompts(2), 6, Sampling(temperature=1.0, seed=4))


def test_bad_input_is_one_clear_error():
    model = tiny()
    for bad, words in (([], "no prompts"), ([[1], []], "prompt 1 is empty"), ([[VOCAB]], "outside")):
        with pytest.raises(InferError, match=words):
            generate(model, bad, 4)
    with pytest.raises(InferError, match="max_new"):
        generate(model, [[1]], 0)
    with pytest.raises(InferError, match="top_p"):
        generate(model, [[1]], 2, Sampling(temperature=1.0, top_p=0.0))
