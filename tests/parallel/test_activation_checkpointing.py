"""train.activation_checkpointing (kiln.trainer.activation_checkpointing): the same loss and every
gradient as without it (fp64), on one rank, under TokenRing and Ulysses (SP=2) and under expert
parallelism (EP=2, all-to-alls inside the recomputed region), on real gloo ranks.

With sequence parallelism the recomputed forward really sends its messages again, in the
backward pass: COMM_STATS' forward-pass bytes stay those of a run without checkpointing and its
backward-pass bytes grow by exactly the forward's (for Ulysses less the doc ids, which it
gathers once per batch and does not gather again in the replay).
"""
import copy

import pytest
import torch
import torch.distributed as dist

from kiln.model import ModelConfig, Transformer
from kiln.model.config import MoEConfig
from kiln.parallel.comm import COMM_STATS
from kiln.parallel.expert import apply_expert_parallel
from kiln.parallel.sequence import LAYOUTS, apply_sequence_parallel, shard_batch
from kiln.trainer.activation_checkpointing import apply_activation_checkpointing
from kiln.trainer.objectives import CausalLM
from tests.dist import run_ranks

MODES = ("full", "selective")
DENSE = ModelConfig(vocab_size=61, dim=24, n_layers=2, n_heads=4, n_kv_heads=2)
MOE = ModelConfig(vocab_size=61, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, mlp="moe",
                  moe=MoEConfig(num_experts=4, top_k=2))


def _batch(seq: int, vocab: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, seq + 1), generator=g)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate([5, 13, 2, 9, 3])])
    doc = torch.stack([doc, (torch.arange(seq) >= 11).long()])
    pos = torch.stack([torch.cat([torch.arange((d == i).sum()) for i in d.unique()]) for d in doc])
    labels = ids[:, 1:].clone()
    labels[:, :-1][doc[:, 1:] != doc[:, :-1]] = -100
    return {"input_ids": ids[:, :-1], "labels": labels, "position_ids": pos, "doc_ids": doc}


def _loss_and_grads(model, batch, loss_group=None):
    COMM_STATS.reset()
    loss = CausalLM(model, loss_group=loss_group)(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, COMM_STATS.snapshot()


def _worst(ref, got) -> float:
    """Largest error, relative to each tensor's largest value, over the loss and all gradients."""
    (l0, g0, _), (l1, g1, _) = ref, got
    assert g0.keys() == g1.keys()
    errs = [float((l0 - l1).abs())] + [float((g1[n] - g0[n]).abs().max()) / max(float(g0[n].abs().max()), 1e-30)
                                       for n in g0]
    return max(errs)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_checkpointing_gives_the_same_gradients_on_one_rank(cfg):
    torch.manual_seed(0)
    base = Transformer(cfg).to(torch.float64)
    batch = _batch(32, 61)
    ref = _loss_and_grads(copy.deepcopy(base), batch)
    for mode in MODES:
        model = copy.deepcopy(base)
        assert apply_activation_checkpointing(model, mode) > 0
        assert _worst(ref, _loss_and_grads(model, batch)) < 1e-12, mode
        with torch.no_grad():  # evaluation skips checkpointing and gives the same loss
            assert torch.equal(CausalLM(model)(**batch), CausalLM(base)(**batch))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="none.*full.*selective"):
        apply_activation_checkpointing(Transformer(DENSE), "some")


def _sp_case(rank, world):
    torch.manual_seed(0)
    base = Transformer(DENSE).to(torch.float64)
    batch = _batch(32, 61)
    out = {}
    for impl in ("tokenring", "ulysses"):
        mine = shard_batch(batch, dist.group.WORLD, LAYOUTS[impl])
        runs = {}
        for mode in ("none", *MODES):
            model = copy.deepcopy(base)
            apply_sequence_parallel(model, dist.group.WORLD, impl)
            apply_activation_checkpointing(model, mode)
            runs[mode] = _loss_and_grads(model, mine, loss_group=dist.group.WORLD)
        out[impl] = {mode: {"err": _worst(runs["none"], runs[mode]), "bytes": runs[mode][2]} for mode in runs}
    doc = shard_batch(batch, dist.group.WORLD, "contiguous")["doc_ids"]
    return {**out, "rank": rank, "doc_bytes": doc.numel() * doc.element_size()}


@pytest.mark.slow
def test_checkpointing_under_sequence_parallelism_and_its_counted_bytes():
    for res in run_ranks(_sp_case, 2, timeout=240):
        rank, doc_bytes = res.pop("rank"), res.pop("doc_bytes")
        for impl, modes in res.items():
            plain = modes["none"]["bytes"]
            kept = {"forward": doc_bytes * (1 - rank), "backward": doc_bytes * rank} if impl == "ulysses" \
                else {"forward": 0, "backward": 0}  # Ulysses' doc ids: gathered in the forward only
            for mode in MODES:
                assert modes[mode]["err"] < 1e-12, (impl, mode, modes[mode]["err"])
                got = modes[mode]["bytes"]
                for d in ("forward", "backward"):
                    assert got["fwd"][d] == plain["fwd"][d], (impl, mode, d)
                    assert got["bwd"][d] == plain["bwd"][d] + plain["fwd"][d] - kept[d], (impl, mode, d)
            assert sum(plain["fwd"].values()) > 0


def _ep_case(rank, world):
    torch.manual_seed(0)
    base = Transformer(MOE).to(torch.float64)
    batch = _batch(32, 61, seed=11 + rank)  # each expert-parallel rank routes its own tokens
    runs = {}
    for mode in ("none", *MODES):
        model = copy.deepcopy(base)
        apply_expert_parallel(model, dist.group.WORLD, None)
        apply_activation_checkpointing(model, mode)
        runs[mode] = _loss_and_grads(model, batch)
    return {mode: _worst(runs["none"], runs[mode]) for mode in MODES}


@pytest.mark.slow
def test_checkpointing_under_expert_parallelism():
    for res in run_ranks(_ep_case, 2, timeout=240):
        for mode, err in res.items():
            assert err < 1e-12, (mode, err)
