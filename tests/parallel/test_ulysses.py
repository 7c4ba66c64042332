"""DeepSpeed-Ulysses (parallel.sp_impl=ulysses) against the single-rank references, real gloo ranks.

Attention alone: fp64 out/dq/dk/dv on contiguous shards equal naive full-sequence attention
(causal, GQA, documents crossing shards), at 2 and 4 ranks, and COMM_STATS equals
comm.expected_bytes("ulysses"). In the model: SP=2 gives SP=1's loss and every gradient (fp64).
Head counts that do not divide over the ranks are refused in one line.
"""
import copy

import pytest
import torch
import torch.distributed as dist

from kiln.model import ModelConfig, Transformer
from kiln.parallel.comm import COMM_STATS, expected_bytes
from kiln.parallel.sequence import apply_sequence_parallel, contiguous_shard, shard_batch
from kiln.parallel.ulysses import UlyssesAttention, ulysses_refusal
from kiln.trainer.objectives import CausalLM
from tests.dist import run_ranks
from tests.parallel.sp_cases import make_problem, naive_attention

pytestmark = pytest.mark.slow

# (batch, chunk c, hq, hkv, head_dim, causal, docs) from sp_cases, S = 2 N c; heads divisible by 4
ULYSSES_CASES = {"causal_mha4": (2, 3, 4, 4, 5, True, False), "causal_docs_gqa": (2, 4, 8, 4, 8, True, True),
                 "noncausal_docs8": (1, 3, 8, 4, 5, False, True)}


def _attention_cases(rank, world):
    attn = UlyssesAttention(dist.group.WORLD)
    out = {}
    for name, (batch, c, hq, hkv, d, causal, docs) in ULYSSES_CASES.items():
        q, k, v, dout, doc = make_problem(batch, 2 * world * c, hq, hkv, d, docs, seed=3)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = naive_attention(*full, causal, doc)
        ref.backward(dout)
        shard = lambda t: contiguous_shard(t, dist.group.WORLD)  # noqa: E731
        mine = [shard(t).requires_grad_() for t in (q, k, v)]
        COMM_STATS.reset()
        got = attn(*mine, causal=causal, doc_ids=shard(doc) if doc is not None else None)
        got.backward(shard(dout))
        errors = {"out": (got - shard(ref)).abs().max().item()}
        for key, g, w in zip(("dq", "dk", "dv"), mine, full):
            errors[key] = (g.grad - shard(w.grad)).abs().max().item()
        out[name] = {"errors": errors, "bytes": COMM_STATS.snapshot(), "dtype": str(got.dtype)}
    try:  # 6 query heads, 2 kv heads: not divisible over 4 ranks
        t = torch.zeros(1, 2, 6, 4, dtype=torch.float64)
        attn(t, t[:, :, :2], t[:, :, :2], causal=True)
        out["refusal"] = None
    except ValueError as e:
        out["refusal"] = str(e)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_equals_full_attention_and_counts_its_bytes(world):
    results = run_ranks(_attention_cases, world, timeout=180)
    for rank, res in enumerate(results):
        for name in ULYSSES_CASES:
            assert res[name]["dtype"] == "torch.float64"
            for key, err in res[name]["errors"].items():
                assert err < 1e-12, (world, rank, name, key, err)
    for name, (batch, c, hq, hkv, d, causal, docs) in ULYSSES_CASES.items():
        want = expected_bytes("ulysses", world=world, batch=batch, s_local=2 * c, hq=hq, hkv=hkv,
                              head_dim=d, itemsize=8, acc_itemsize=8, causal=causal,
                              doc_itemsize=8 if docs else 0)
        for phase in ("fwd", "bwd"):
            for direction in ("forward", "backward"):
                got = sum(r[name]["bytes"][phase][direction] for r in results)
                assert got == want[phase][direction] > 0, (name, phase, direction, got, want)
    if world == 4:
        msg = results[0]["refusal"]
        assert msg is not None and "\n" not in msg
        assert "n_heads (6)" in msg and "kv heads (2)" in msg and "parallel.sp (4)" in msg
    else:  # 6 and 2 heads do divide over 2 ranks: it runs
        assert results[0]["refusal"] is None


def _batch(seq: int, vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, seq + 1), generator=g)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate([5, 13, 2, 9, 3])])  # crosses shards
    doc = torch.stack([doc, (torch.arange(seq) >= 11).long()])
    pos = torch.stack([torch.cat([torch.arange((d == i).sum()) for i in d.unique()]) for d in doc])
    labels = ids[:, 1:].clone()
    labels[:, :-1][doc[:, 1:] != doc[:, :-1]] = -100
    labels[0, 3] = labels[1, 20] = -100  # the two ranks hold different numbers of labels
    return {"input_ids": ids[:, :-1], "labels": labels, "position_ids": pos, "doc_ids": doc}


def _model_sp_equals_sp1(rank, world):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=24, n_layers=2, n_heads=4, n_kv_heads=2)
    ref_model = Transformer(cfg).to(torch.float64)
    sp_model = copy.deepcopy(ref_model)
    batch = _batch(32, 61)
    ref_loss = CausalLM(ref_model)(**batch)
    ref_loss.backward()
    apply_sequence_parallel(sp_model, dist.group.WORLD, "ulysses")
    loss = CausalLM(sp_model, loss_group=dist.group.WORLD)(**shard_batch(batch, dist.group.WORLD, "contiguous"))
    loss.backward()
    loss = loss.detach().clone()
    dist.all_reduce(loss)  # what DeepSpeed does: average loss and gradients over the ranks
    errs = {"loss": (loss / world - ref_loss.detach()).abs().item()}
    for (name, p), q in zip(sp_model.named_parameters(), ref_model.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        errs[name] = ((g / world - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-30)).item()
    return errs


def test_ulysses_sp2_equals_sp1_in_the_model():
    for rank_errs in run_ranks(_model_sp_equals_sp1, 2, timeout=180):
        worst = max(rank_errs.items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-10, worst


def test_refusal_names_the_counts_and_the_way_out():
    assert ulysses_refusal(8, 4, 4) is None and ulysses_refusal(8, 2, 2) is None
    msg = ulysses_refusal(8, 2, 4)
    assert "kv heads (2)" in msg and "parallel.sp (4)" in msg and "tokenring" in msg
