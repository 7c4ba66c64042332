"""MEAP's prepare_batch and loss on hand-built batches: the masked fraction, untouched targets and
model call, the (seed, step, rank) draws, the two position modes, and the recipe's checks."""
import math

import pytest
import torch

from kiln.model import ModelConfig, Transformer, flops_per_token
from kiln.trainer.config import ConfigError, from_dict
from kiln.trainer.objectives import MEAP, CausalLM, build_objective
from kiln.trainer.objectives.config import ObjectiveConfig

MASK, VOCAB = 1, 97


def batch(b=8, s=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, 40] = -100  # a document border: no label there
    pos = torch.arange(s).repeat(b, 1)
    pos[:, 41:] -= 41
    docs = (torch.arange(s) > 40).long().repeat(b, 1)
    return {"input_ids": ids[:, :-1].clone(), "labels": labels, "position_ids": pos, "doc_ids": docs}


def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2))


def meap(ratio=0.15, same=False, seed=7, rank=0, m=None):
    cfg = ObjectiveConfig(name="meap")
    cfg.meap.mask_ratio, cfg.meap.same_positions_per_batch = ratio, same
    return build_objective("meap", m or model(), cfg, seed=seed, rank=rank, mask_id=MASK)


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.5])
@pytest.mark.parametrize("same", [False, True])
def test_masked_fraction_is_binomial_and_only_inputs_change(ratio, same):
    obj, b = meap(ratio, same), batch()
    out = obj.prepare_batch(b, step=3)
    masked = out["input_ids"] != b["input_ids"]
    assert (out["input_ids"][masked] == MASK).all()
    eligible = b["labels"] != -100
    assert not masked[~eligible].any()  # unlabelled positions are never masked
    n = int(eligible.sum()) if not same else b["labels"].shape[1] - 1  # one draw per column when shared
    k = int(masked.sum()) if not same else int(masked[0].sum())
    sd = math.sqrt(n * ratio * (1 - ratio))
    assert abs(k - n * ratio) < 5 * sd, (k, n * ratio, sd)  # 5 sigma: a 1-in-10^6 miss
    assert obj.mask_rate == int(masked.sum()) / int(eligible.sum())
    for key in ("labels", "position_ids", "doc_ids"):  # targets, positions and documents untouched
        assert torch.equal(out[key], b[key])
    assert torch.equal(b["input_ids"], batch()["input_ids"])  # the caller's batch is not modified


def test_rows_get_fresh_positions_or_share_one_set():
    b = batch()
    per_row = meap().prepare_batch(b, 0)["input_ids"] == MASK
    assert len({tuple(r.tolist()) for r in per_row}) == per_row.shape[0]
    shared = meap(same=True).prepare_batch(b, 0)["input_ids"] == MASK
    assert all(torch.equal(r, shared[0]) for r in shared)


def test_masks_differ_by_step_and_rank_and_repeat_on_a_resumed_objective():
    b = batch()
    obj = meap()
    m = {s: obj.prepare_batch(b, s)["input_ids"] for s in (0, 1, 2)}
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[1], m[2])
    resumed = meap()  # a new process with the same (seed, rank), e.g. after a resume
    assert all(torch.equal(resumed.prepare_batch(b, s)["input_ids"], m[s]) for s in (2, 0, 1))
    assert not torch.equal(meap(rank=1).prepare_batch(b, 1)["input_ids"], m[1])
    assert not torch.equal(meap(seed=8).prepare_batch(b, 1)["input_ids"], m[1])


def test_loss_is_the_causal_loss_of_the_masked_inputs_with_the_same_model_call():
    m = model()
    calls = []
    m.register_forward_hook(lambda mod, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True)
    obj, clm = meap(m=m), CausalLM(m)
    b = obj.prepare_batch(batch(), 5)
    obj.train()
    loss, metrics = obj.loss(**b)
    ref, ref_metrics = clm.loss(**b)
    assert torch.equal(loss, ref)
    assert metrics == {**ref_metrics, "mask_rate": obj.mask_rate}
    (a1, k1), (a2, k2) = calls  # the same call: inputs, positions, documents, nothing else
    assert torch.equal(a1[0], a2[0]) and k1.keys() == k2.keys() == {"position_ids", "doc_ids"}
    assert obj.flops_per_token(256) == flops_per_token(m.cfg, 256) == clm.flops_per_token(256)
    obj.eval()
    assert "mask_rate" not in obj.loss(**b)[1]  # evaluation reports the loss alone


def test_meap_needs_the_mask_id():
    with pytest.raises(ValueError, match="MASK id"):
        build_objective("meap", model(), ObjectiveConfig(name="meap"))
    assert isinstance(meap(), MEAP)


@pytest.mark.parametrize("values, message", [
    ({"objective": {"meap": {"mask_ratio": 0}}}, "objective.meap.mask_ratio must lie in (0, 1) (got 0"),
    ({"objective": {"meap": {"mask_ratio": 1.5}}}, "objective.meap.mask_ratio must lie in (0, 1) (got 1.5)"),
    ({"objective": {"meap": {"same_positions_per_batch": "sometimes"}}}, "objective.meap.same_positions_per_batch"),
    ({"objective": {"meap": {"ratio": 0.1}}}, "mask_ratio"),
    ({"objective": {"name": "mep"}}, "did you mean 'meap'"),
    ({"objective": {"name": "meap"}, "model": {"causal": False}}, "objective.name=meap needs model.causal=true"),
])
def test_bad_meap_values_give_one_line_errors(values, message):
    with pytest.raises(ConfigError) as e:
        from_dict(values)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
