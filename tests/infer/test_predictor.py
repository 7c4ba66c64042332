"""The routing-path predictor, trained on routes recorded from a real (random) MoE, beats the
per-layer frequency baseline on held-out routes; it saves with a manifest and reloads exactly,
and a file that fails the manifest is refused."""
import json

import pytest
import torch

from kiln.infer.errors import InferError
from kiln.infer.expertflow import predictor as P
from tests.infer.conftest import VOCAB, tiny


def _routes(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return P.record_routes(model, [{"input_ids": torch.randint(0, VOCAB, (8, 24), generator=g)} for _ in range(n)])


def test_routes_are_the_routers_choices():
    model = tiny("moe")
    toks, routes = _routes(model, 1, 0)
    assert routes.shape == (8, 24, 2, 2)
    h = model.embed(toks)  # layer 0's router sees the normed embedding
    idx, _, _ = model.layers[0].mlp.router(model.layers[0].mlp_norm(
        h + model.layers[0].attn(model.layers[0].attn_norm(h), *__import__("kiln").kernels.rope_cos_sin(
            torch.arange(24).expand(8, 24), model.cfg.head_dim, model.cfg.rope_theta), None)).reshape(-1, 32))
    assert torch.equal(routes[:, :, 0].reshape(-1, 2), idx)


def test_predictor_beats_the_frequency_baseline_and_round_trips(tmp_path):
    model = tiny("moe")
    toks, routes = _routes(model, 24, 0)
    vt, vr = _routes(model, 4, 1)
    cfg = P.PredictorConfig(vocab_size=VOCAB, layers=2, experts=8, top_k=2, dim=32, n_layers=1)
    pred = P.train_predictor(toks, routes, cfg, steps=150, batch=32, lr=1e-2)
    m = P.route_metrics(pred, vt, vr, P.frequency(routes, 8), batch_tokens=4)
    assert m["token/accuracy"] > m["token/baseline_accuracy"] + 0.2, m
    assert m["batch/recall"] > m["batch/baseline_recall"], m
    for l in range(2):
        assert m[f"token/accuracy_l{l}"] > m[f"token/baseline_accuracy_l{l}"]
    P.save_predictor(pred, tmp_path, {"scores": m})
    back = P.load_predictor(tmp_path)
    assert torch.equal(back.predict(vt), pred.predict(vt))
    assert json.loads((tmp_path / P.MANIFEST).read_text())["scores"]["token/accuracy"] == m["token/accuracy"]
    (tmp_path / P.FILE).write_bytes((tmp_path / P.FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(InferError, match="checksum"):
        P.load_predictor(tmp_path)
    with pytest.raises(InferError, match="train-predictor"):
        P.load_predictor(tmp_path / "missing")


def test_frequency_and_multi_hot():
    routes = torch.tensor([[[[0, 1]], [[1, 2]]]])           # 1 seq, 2 tokens, 1 layer, k=2
    assert P.frequency(routes, 3).tolist() == [[1.0, 2.0, 1.0]]
    assert P.multi_hot(torch.tensor([[3, 0]]), 3).tolist() == [[1.0, 0.0, 0.0]]  # dropped id 3 ignored
