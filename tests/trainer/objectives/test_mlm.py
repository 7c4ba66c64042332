"""MLM's prepare_batch and loss on hand-built batches: the selected fraction within binomial
bounds, BERT's 80/10/10 corruption, untouched positions and documents, the (seed, step, rank)
draws, the loss at the selected positions only, and the recipe's checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from kiln.model import ModelConfig, Transformer, flops_per_token
from kiln.trainer.config import ConfigError, from_dict
from kiln.trainer.objectives import MLM, build_objective
from kiln.trainer.objectives.config import ObjectiveConfig

MASK, VOCAB = 1, 97


def batch(b=8, s=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s + 1), generator=g)
    return {"input_ids": ids[:, :-1].clone(), "labels": ids[:, 1:].clone(),
            "position_ids": torch.arange(s).repeat(b, 1), "doc_ids": (torch.arange(s) > 40).long().repeat(b, 1)}


def mlm(ratio=0.15, seed=7, rank=0, causal=False):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, causal=causal))
    cfg = ObjectiveConfig(name="mlm")
    cfg.mlm.mask_ratio = ratio
    return build_objective("mlm", m, cfg, seed=seed, rank=rank, mask_id=MASK)


def within(k, n, p, sigmas=5):
    """k successes of n draws lie within `sigmas` binomial sd of n p (5: a 1-in-10^6 miss)."""
    return abs(k - n * p) < sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.4])
def test_selected_fraction_is_binomial_and_corruption_is_80_10_10(ratio):
    obj, b = mlm(ratio), batch()
    out = obj.prepare_batch(b, 3)
    selected = out["labels"] != -100
    n, k = selected.numel(), int(selected.sum())
    assert within(k, n, ratio), (k, n * ratio)
    assert obj.mask_rate == k / n
    assert torch.equal(out["labels"][selected], b["input_ids"][selected])  # targets: the originals
    assert torch.equal(out["targets"], b["input_ids"])
    inputs = out["input_ids"]
    assert torch.equal(inputs[~selected], b["input_ids"][~selected])  # unselected positions untouched
    masked = int((inputs[selected] == MASK).sum())
    kept = int((inputs[selected] == b["input_ids"][selected]).sum())
    other = k - masked - kept  # random tokens (a random draw equal to the original counts as kept)
    assert within(masked, k, 0.8) and within(other, k, 0.1 * (1 - 1 / VOCAB), 6) and within(kept, k, 0.1, 6)
    for key in ("position_ids", "doc_ids"):
        assert torch.equal(out[key], b[key])
    assert torch.equal(b["input_ids"], batch()["input_ids"])  # the caller's batch is not modified


def test_masks_differ_by_step_and_rank_and_repeat_on_a_resumed_objective():
    b = batch()
    obj = mlm()
    m = {s: obj.prepare_batch(b, s)["input_ids"] for s in (0, 1)}
    assert not torch.equal(m[0], m[1])
    assert all(torch.equal(mlm().prepare_batch(b, s)["input_ids"], m[s]) for s in (1, 0))
    assert not torch.equal(mlm(rank=1).prepare_batch(b, 1)["input_ids"], m[1])


def test_loss_is_the_cross_entropy_of_the_selected_originals():
    obj = mlm()
    b = obj.prepare_batch(batch(b=2, s=64), 5)
    obj.train()
    loss, metrics = obj.loss(**b)
    sel = b["labels"] != -100
    with torch.no_grad():
        logits = obj.model.logits(obj.model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"]))
    ref = F.cross_entropy(logits[sel], b["targets"][sel])
    assert math.isclose(float(loss.detach()), float(ref), rel_tol=1e-5)
    assert metrics["mlm_acc"] == (logits[sel].argmax(-1) == b["targets"][sel]).float().mean()
    obj.eval()  # a plain batch is masked by the fixed evaluation draw, the same each time
    plain = batch(b=2, s=64)
    first, m = obj.loss(**plain)
    assert m == {} and torch.equal(first, obj.loss(**plain)[0])
    cfg = obj.model.cfg
    assert obj.flops_per_token(64) == flops_per_token(cfg, 64) - 6 * cfg.dim * cfg.vocab_size * 0.85


def test_the_encoder_sees_both_directions_and_stays_within_documents():
    obj = mlm()
    ids = batch(b=1, s=64)
    pos, docs = ids["position_ids"], ids["doc_ids"]
    with torch.no_grad():
        h = obj.model(ids["input_ids"], position_ids=pos, doc_ids=docs)
        later = ids["input_ids"].clone()
        later[0, 30] = 5  # a later token of the first document (0..40) changes an earlier state
        h2 = obj.model(later, position_ids=pos, doc_ids=docs)
        other = ids["input_ids"].clone()
        other[0, 50] = 5  # a token of the second document changes nothing in the first
        h3 = obj.model(other, position_ids=pos, doc_ids=docs)
    assert not torch.allclose(h[0, 10], h2[0, 10])
    assert torch.equal(h[0, :41], h3[0, :41])


def test_mlm_needs_an_encoder_and_the_mask_id():
    with pytest.raises(ConfigError, match="set model.causal=false"):
        mlm(causal=True)
    with pytest.raises(ValueError, match="MASK id"):
        build_objective("mlm", mlm().model, ObjectiveConfig(name="mlm"))
    assert isinstance(mlm(), MLM)


@pytest.mark.parametrize("values, message", [
    ({"objective": {"mlm": {"mask_ratio": 0}}}, "objective.mlm.mask_ratio must lie in (0, 1) (got 0"),
    ({"objective": {"mlm": {"mask_fraction": 0.95}}}, "objective.mlm.mask_fraction + objective.mlm.random_fraction"),
    ({"objective": {"mlm": {"random_fraction": -0.1}}}, "objective.mlm.random_fraction must lie in [0, 1]"),
])
def test_bad_mlm_values_give_one_line_errors(values, message):
    with pytest.raises(ConfigError) as e:
        from_dict(values)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
