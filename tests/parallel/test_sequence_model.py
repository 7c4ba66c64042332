"""Sequence parallelism applied to the real model: SP=2 gives SP=1's loss and gradients.

Real gloo processes. Both ranks build the same seeded model and the same global batch; the
reference is the unsplit model on one rank, the candidate the model with TokenRing (or Ring)
over both ranks on zigzag shards, with documents that cross the shard boundaries.
"""
import copy

import pytest
import torch
import torch.distributed as dist

from kiln.parallel.sequence import apply_sequence_parallel, shard_batch
from kiln.model import ModelConfig, Transformer
from kiln.trainer.objectives import CausalLM
from tests.dist import run_ranks

pytestmark = pytest.mark.slow


def _batch(seq: int, vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, seq + 1), generator=g)
    # documents of uneven lengths; several cross the zigzag chunk boundaries
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate([5, 13, 2, 9, 3])])
    doc = torch.stack([doc, doc.flip(0) * 0 + (torch.arange(seq) >= 11).long()])
    pos = torch.stack([torch.cat([torch.arange((d == i).sum()) for i in d.unique()]) for d in doc])
    labels = ids[:, 1:].clone()
    labels[:, :-1][doc[:, 1:] != doc[:, :-1]] = -100
    labels[0, 3] = labels[1, 2] = -100  # rank 0 gets 4 ignored labels, rank 1 gets 3
    return {"input_ids": ids[:, :-1], "labels": labels, "position_ids": pos, "doc_ids": doc}


def _sp_matches_single_device(rank, world, dtype_name, impl):
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=24, n_layers=2, n_heads=4, n_kv_heads=2)
    ref_model = Transformer(cfg).to(dtype)
    sp_model = copy.deepcopy(ref_model)
    batch = _batch(32, 61)

    ref = CausalLM(ref_model)
    ref_loss = ref(**batch)
    ref_loss.backward()

    apply_sequence_parallel(sp_model, dist.group.WORLD, impl)
    sp = CausalLM(sp_model, loss_group=dist.group.WORLD)
    loss = sp(**shard_batch(batch, dist.group.WORLD))
    loss.backward()
    # what DeepSpeed does: average the loss and gradients over the ranks
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    loss /= world
    errs = {"loss": (loss - ref_loss.detach()).abs().item()}
    for (name, p), q in zip(sp_model.named_parameters(), ref_model.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        g /= world
        errs[name] = ((g - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-30)).item()
    return errs


@pytest.mark.parametrize("impl", ["tokenring", "ring"])
def test_sp2_equals_sp1_in_the_model(impl):
    for dtype, tol in (("float64", 1e-10), ("float32", 2e-5)):
        errs = run_ranks(_sp_matches_single_device, 2, dtype, impl, timeout=180)
        for rank_errs in errs:
            worst = max(rank_errs.items(), key=lambda kv: kv[1])
            assert worst[1] < tol, (impl, dtype, worst)
