"""ELECTRA on hand-built batches: replaced labels, no gradient through sampling, the one shared
embedding Parameter, the lambda weighting, FLOPs of both models, the masks' draws and the recipe."""
import math

import pytest
import torch
import torch.nn.functional as F

from kiln.model import ModelConfig, Transformer, flops_per_token
from kiln.trainer.config import ConfigError, from_dict
from kiln.trainer.objectives import Electra, build_objective
from kiln.trainer.objectives.config import ObjectiveConfig
from kiln.trainer.objectives.electra import generator_config, rtd_labels, sample_tokens
from kiln.trainer.optim import param_groups

MASK, VOCAB = 1, 97


def batch(b=4, s=64, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s + 1), generator=g)
    return {"input_ids": ids[:, :-1].clone(), "labels": ids[:, 1:].clone(),
            "position_ids": torch.arange(s).repeat(b, 1), "doc_ids": (torch.arange(s) > 20).long().repeat(b, 1)}


def electra(weight=50.0, seed=7, rank=0, width=0.25, vocab=VOCAB, tie=False):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, causal=False,
                                tie_embeddings=tie))
    cfg = ObjectiveConfig(name="electra")
    cfg.electra.disc_weight, cfg.electra.generator_width = weight, width
    return build_objective("electra", m, cfg, seed=seed, rank=rank, mask_id=MASK)


def discriminator_input(obj, b):
    """(loss, metrics, the token ids the discriminator saw) of one training forward."""
    seen = []
    handle = obj.model.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    obj.train()
    loss, metrics = obj.loss(**b)
    handle.remove()
    return loss, metrics, seen[0]


def test_sampling_follows_the_generator_and_equal_samples_count_as_original():
    logits = torch.tensor([[0.0, 0.0, 50.0], [50.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    noise = torch.tensor([0.5, 0.99, 0.5])
    got = sample_tokens(logits, noise)
    assert got.tolist() == [2, 0, 1] and got.grad_fn is None and not got.is_floating_point()
    # inverse CDF: the uniform's thirds pick the tokens of a flat softmax, each once
    flat = sample_tokens(torch.zeros(3, 3), torch.tensor([0.1, 0.5, 0.9]))
    assert flat.tolist() == [0, 1, 2]
    assert sample_tokens(torch.zeros(4, 3), torch.tensor([0.1, 0.4, 0.6, 0.9]), never=1).tolist() == [0, 0, 2, 2]
    assert rtd_labels(torch.tensor([5, 7, 9]), torch.tensor([5, 8, 9])).tolist() == [0.0, 1.0, 0.0]


def test_a_token_is_labelled_replaced_exactly_when_the_sample_differs():
    # a 6-token vocabulary: the generator often samples the original, which must count as original
    obj, b = electra(vocab=6), batch(vocab=6)
    b = obj.prepare_batch(b, 3)
    masked = b["labels"] != -100
    loss, metrics, seen = discriminator_input(obj, b)
    assert torch.equal(seen[~masked], b["targets"][~masked])  # only masked positions are resampled
    assert (seen[masked] != MASK).all()  # the discriminator never sees MASK
    same = masked & (seen == b["targets"])
    assert same.any() and (masked & (seen != b["targets"])).any()  # both cases occur here
    replaced = (seen != b["targets"]).float()
    assert metrics["replaced_frac"] == replaced.mean()
    assert metrics["replaced_frac"] < metrics["mask_rate"]  # the equal samples are not counted
    # the RTD loss is the BCE against exactly those labels, over every token
    with torch.no_grad():
        logits = obj.rtd(obj.model(seen, position_ids=b["position_ids"], doc_ids=b["doc_ids"]))
    assert torch.allclose(metrics["rtd_loss"], F.binary_cross_entropy_with_logits(logits, replaced), atol=0, rtol=1e-6)
    assert metrics["disc_acc"] == ((logits > 0).float() == replaced).float().mean()


def test_no_gradient_reaches_the_generator_through_sampling():
    grads = {}
    for weight in (50.0, 1.0):  # the RTD loss's weight must not move the generator's gradients
        obj = electra(weight=weight)
        b = obj.prepare_batch(batch(), 1)
        loss, _, _ = discriminator_input(obj, b)
        loss.backward()
        grads[weight] = {n: p.grad.clone() for n, p in obj.gen.named_parameters()}
        disc = {n: p.grad for n, p in obj.model.named_parameters() if n.startswith("layers.")}
        assert all(g is not None and g.abs().sum() > 0 for g in disc.values())  # RTD trains the discriminator
    assert grads[50.0].keys() == grads[1.0].keys() and grads[50.0]
    for n in grads[50.0]:
        assert torch.equal(grads[50.0][n], grads[1.0][n]), n


@pytest.mark.parametrize("tie", [False, True])
def test_the_token_embedding_is_one_parameter(tie):
    obj = electra(tie=tie)
    emb = obj.model.embed.weight
    assert obj.gen.head.matrix is emb  # the generator scores against the same Parameter
    named = dict(obj.named_parameters())
    assert [n for n, p in named.items() if p is emb] == ["model.embed.weight"]
    trained = [p for g in param_groups(obj, 0.1) for p in g["params"]]
    assert sum(p is emb for p in trained) == 1
    assert all(p.requires_grad for p in obj.gen.parameters())
    head = obj.model.head.weight  # the discriminator's own LM head takes no part
    assert (head is None) == tie and (tie or not any(p is head for p in trained))
    # one step moves the shared Parameter once for both models
    b = obj.prepare_batch(batch(), 0)
    loss, _, _ = discriminator_input(obj, b)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_loss_is_mlm_plus_lambda_rtd_on_a_hand_built_case():
    obj = electra()
    b = obj.prepare_batch(batch(), 2)
    loss, metrics, seen = discriminator_input(obj, b)
    masked = b["labels"] != -100
    with torch.no_grad():  # the two parts computed by hand from the modules
        hidden = obj.gen(obj.model.embed(b["input_ids"]), b["position_ids"], b["doc_ids"])
        logits = hidden[masked] @ obj.model.embed.weight.t()
        mlm = F.cross_entropy(logits, b["targets"][masked])
        rtd_logits = obj.rtd(obj.model(seen, position_ids=b["position_ids"], doc_ids=b["doc_ids"]))
        rtd = F.binary_cross_entropy_with_logits(rtd_logits, (seen != b["targets"]).float())
    assert math.isclose(float(metrics["gen_loss"]), float(mlm), rel_tol=1e-5)
    assert math.isclose(float(metrics["rtd_loss"]), float(rtd), rel_tol=1e-5)
    assert math.isclose(float(loss.detach()), float(mlm + 50 * rtd), rel_tol=1e-5)
    assert metrics["gen_mlm_acc"] == (logits.argmax(-1) == b["targets"][masked]).float().mean()
    loss1 = electra(weight=1.0).loss(**b)[0]  # same weights and draws: the difference is 49 RTD
    assert math.isclose(float((loss - loss1).detach()), 49 * float(rtd), rel_tol=1e-4)


def test_masks_are_mask_tokens_on_fifteen_percent_drawn_by_seed_step_and_rank():
    obj, b = electra(), batch(b=8, s=256)
    out = obj.prepare_batch(b, 5)
    masked = out["labels"] != -100
    assert torch.equal(out["input_ids"], b["input_ids"].masked_fill(masked, MASK))  # MASK only, no random
    assert torch.equal(out["targets"], b["input_ids"]) and torch.equal(out["labels"][masked], b["input_ids"][masked])
    n = masked.numel()
    assert abs(int(masked.sum()) - 0.15 * n) < 5 * math.sqrt(n * 0.15 * 0.85)
    assert ((out["noise"] >= 0) & (out["noise"] < 1)).all()
    again = electra().prepare_batch(b, 5)  # a resumed process redraws the same
    assert all(torch.equal(again[k], out[k]) for k in out)
    assert not torch.equal(obj.prepare_batch(b, 6)["labels"], out["labels"])
    assert not torch.equal(electra(rank=1).prepare_batch(b, 5)["labels"], out["labels"])


def test_evaluation_masks_plain_batches_the_same_way_every_time():
    obj, b = electra(), batch()
    obj.eval()
    first, metrics = obj.loss(**b)
    assert metrics == {} and torch.equal(first, obj.loss(**b)[0])


def test_generator_width_and_flops_count_both_models():
    obj = electra()
    d, g = obj.model.cfg, obj.gen.cfg
    assert (g.dim, g.n_heads, g.n_kv_heads, g.head_dim, g.n_layers) == (16, 1, 1, d.head_dim, d.n_layers)
    assert generator_config(d, 0.5).dim == 32 and generator_config(d, 1.0).dim == 64
    gen_cfg = generator_config(d, 1.0)
    assert gen_cfg.n_kv_heads == 2 and not gen_cfg.causal
    s = 64
    disc_only = flops_per_token(d, s) - 6 * d.dim * d.vocab_size + 6 * (d.dim * d.dim + d.dim)
    gen = (flops_per_token(g, s) - 6 * g.dim * g.vocab_size + 6 * 2 * d.dim * g.dim
           + 6 * d.dim * d.vocab_size * 0.15)
    assert math.isclose(obj.flops_per_token(s), disc_only + gen)
    assert obj.flops_per_token(s) > flops_per_token(d, s) - 6 * d.dim * d.vocab_size


def test_electra_needs_an_encoder_and_the_mask_id():
    m = Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2))
    with pytest.raises(ConfigError, match="set model.causal=false"):
        build_objective("electra", m, ObjectiveConfig(name="electra"), mask_id=MASK)
    with pytest.raises(ValueError, match="MASK id"):
        build_objective("electra", m, ObjectiveConfig(name="electra"))
    assert isinstance(electra(), Electra)


@pytest.mark.parametrize("values, message", [
    ({"objective": {"electra": {"disc_weight": 0}}}, "objective.electra.disc_weight must be > 0"),
    ({"objective": {"electra": {"generator_width": 1.5}}}, "objective.electra.generator_width must lie in (0, 1]"),
    ({"objective": {"electra": {"mask_ratio": 1}}}, "objective.electra.mask_ratio must lie in (0, 1)"),
    ({"objective": {"name": "electar"}}, "did you mean 'electra'"),
])
def test_bad_electra_values_give_one_line_errors(values, message):
    with pytest.raises(ConfigError) as e:
        from_dict(values)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_the_discriminator_learns_replacements_it_can_see():
    # counting sequences (each token is its neighbour + 1): a replacement is visible from its
    # context, so the RTD loss must fall well below the entropy of the replaced fraction (what
    # calling every token "original" scores) and the accuracy rise above 1 - replaced
    obj = electra(vocab=64)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    last = []
    for step in range(130):
        ids = (torch.randint(0, 40, (16, 1), generator=g) + torch.arange(32)) % 60 + 4
        b = obj.prepare_batch({"input_ids": ids, "labels": ids, "position_ids": torch.arange(32).expand(16, 32)}, step)
        loss, metrics, _ = discriminator_input(obj, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 120:
            last.append({k: float(v) for k, v in metrics.items()})
    r = sum(m["replaced_frac"] for m in last) / len(last)
    prior = -(r * math.log(r) + (1 - r) * math.log(1 - r))
    assert sum(m["rtd_loss"] for m in last) / len(last) < 0.5 * prior, (last[-1], prior)
    assert sum(m["disc_acc"] for m in last) / len(last) > 1 - r + 0.05
