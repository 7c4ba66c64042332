"""Variable-length steps with sequence parallelism: a long-bucket step (TokenRing over each pair
of ranks, rows sharded along the sequence) and a short-bucket step (rows split over all ranks,
local attention) both give the single-rank loss and gradients.

4 real gloo ranks (2 sequence groups of 2), fp64. Rows come from the real DecomposeLoader over
decomposition buckets; the loss is normalised over the world group as the trainer does
(kiln.trainer.batches), and gradients are averaged over all ranks as DeepSpeed does.
Labels are masked unevenly (by token value), so ranks hold different numbers of labels.
"""
import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist

from kiln.data.decompose_loader import DecomposeLoader
from kiln.data.decompose import bucket_prefix, decompose_split
from kiln.parallel.sequence import apply_sequence_parallel, shard_batch
from kiln.parallel.sequence_switch import SequenceSwitch
from kiln.model import ModelConfig, Transformer
from kiln.trainer.objectives import CausalLM
from tests.data.test_decompose import _write_docs
from tests.dist import run_ranks

pytestmark = pytest.mark.slow

LO, HI, T, SP_MIN = 3, 5, 128, 32  # buckets 8, 16 (data-parallel), 32 (sequence-parallel)
VOCAB = 53


def _mask(batch):
    batch["labels"][batch["input_ids"] % 3 == 0] = -100
    return batch


def _case(rank, world, prefixes):
    sp = 2
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    sp_group = groups[rank // sp]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=24, n_layers=2, n_heads=4, n_kv_heads=2)
    ref_model = Transformer(cfg).double()
    model = copy.deepcopy(ref_model)
    apply_sequence_parallel(model, sp_group, "tokenring")
    switch = SequenceSwitch(model)
    objective = CausalLM(model, loss_group=dist.group.WORLD)  # the trainer's loss normalisation
    loader = DecomposeLoader(prefixes, T, rank, world, sp=sp, sp_min_len=SP_MIN, seed=1)
    ref_loader = DecomposeLoader(prefixes, T, 0, 1, seed=1)
    out = {}
    seen = set()
    for step in range(loader.steps_per_epoch):
        plan = loader.plan(step)
        if plan.sp in seen:
            continue
        seen.add(plan.sp)
        ref_model.zero_grad()
        objective.zero_grad()
        # single rank: the whole step at once
        whole = _mask(ref_loader.rows_of(plan.bucket, ref_loader.global_chunks(step)))
        ref_loss = CausalLM(ref_model)(**whole)
        ref_loss.backward()
        batch = _mask(loader.batch(step))
        switch.on = plan.sp
        if plan.sp:
            batch = shard_batch(batch, sp_group)
        loss = objective(**batch)
        loss.backward()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= world
        errs = {"loss": (loss - ref_loss.detach()).abs().item()}
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)  # DeepSpeed: average over every rank
            g /= world
            errs[name] = ((g - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-30)).item()
        out["sp" if plan.sp else "dp"] = (plan.seq_len, batch["input_ids"].shape, errs)
        if len(seen) == 2:
            break
    return out


def _fold(ids):
    """_write_docs numbers the tokens 0, 1, 2, ...: hash them into the vocabulary (so masked
    label counts differ between ranks)."""
    return (np.asarray(ids, np.int64) * 2654435761 % 1000003 % VOCAB).astype(np.int32)


def make_buckets(d):
    """Bucket files 2^LO..2^HI of 200 short documents, token ids folded into the vocabulary."""
    rng = np.random.default_rng(0)
    _write_docs(d / "train", rng.integers(1, 90, 200).tolist())
    decompose_split(d / "train", d, "train", LO, HI, np.random.default_rng(0))
    for k in range(LO, HI + 1):
        tokens = np.memmap(bucket_prefix(d, "train", k) + ".bin", dtype=np.int32, mode="r+")
        tokens[:] = _fold(tokens)
        tokens.flush()
        nxt = np.load(bucket_prefix(d, "train", k) + ".next.npy")
        np.save(bucket_prefix(d, "train", k) + ".next.npy", np.where(nxt >= 0, _fold(nxt), nxt))
    return {k: bucket_prefix(d, "train", k) for k in range(LO, HI + 1)}


def test_short_and_long_bucket_steps_match_one_rank(tmp_path):
    prefixes = make_buckets(tmp_path)
    results = run_ranks(_case, 4, prefixes, timeout=240)
    for rank, res in enumerate(results):
        assert set(res) == {"sp", "dp"}, res.keys()
        seq, shape, _ = res["sp"]
        assert seq >= SP_MIN and shape == (T // seq // 2, seq // 2)  # 2 groups, half the sequence
        seq, shape, _ = res["dp"]
        assert seq < SP_MIN and shape == (T // seq // 4, seq)  # 4 ranks, whole rows
        for kind in ("sp", "dp"):
            worst = max(res[kind][2].items(), key=lambda kv: kv[1])
            assert worst[1] < 1e-10, (rank, kind, worst)
