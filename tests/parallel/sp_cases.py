"""Shared cases for the sequence-parallel attention tests (TokenRing and Ring).

`run_cases(rank, world, impl)` runs inside each gloo rank (via tests.dist.run_ranks): every
case builds the full fp64 problem on every rank from one seed, computes the naive reference
with autograd, runs the distributed algorithm on this rank's zigzag shards, and reports max
abs errors of out, dq, dk, dv on the shard, plus the bytes counted by COMM_STATS.
"""
import torch
import torch.distributed as dist

from kiln.parallel.comm import COMM_STATS
from kiln.parallel.ring import ring_attention
from kiln.parallel.tokenring import tokenring_attention
from kiln.parallel.zigzag import zigzag_shard

IMPLS = {"tokenring": tokenring_attention, "ring": ring_attention}

# name: (batch, chunk c (S = 2 N c), hq, hkv, head_dim, causal, docs)
CASES = {
    "causal_mha": (2, 3, 2, 2, 5, True, False),
    "causal_gqa": (1, 4, 6, 2, 12, True, False),
    "noncausal_gqa": (2, 3, 4, 1, 5, False, False),
    "causal_docs_gqa": (2, 4, 4, 2, 8, True, True),
    "noncausal_docs": (1, 3, 2, 2, 5, False, True),
}


def naive_attention(q, k, v, causal, doc=None):
    """softmax(QK^T / sqrt(D)) V on full sequences with an explicit mask (fp64 reference)."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * q.shape[-1] ** -0.5
    n = q.shape[1]
    allowed = torch.ones(q.shape[0], n, n, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(n, n).tril().bool()
    if doc is not None:
        allowed &= doc[:, :, None] == doc[:, None, :]
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), vv)


def make_problem(batch, seq, hq, hkv, d, docs, seed):
    """Full fp64 q, k, v, dout and (optionally) doc ids whose documents cross shard borders."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, hq, d, dtype=torch.float64, generator=g)
    k = torch.randn(batch, seq, hkv, d, dtype=torch.float64, generator=g)
    v = torch.randn(batch, seq, hkv, d, dtype=torch.float64, generator=g)
    dout = torch.randn(batch, seq, hq, d, dtype=torch.float64, generator=g)
    doc = None
    if docs:  # random document starts: runs of 1..seq/2 tokens, ids global within the row
        starts = torch.rand(batch, seq, generator=g) < 0.2
        starts[:, 0] = True
        doc = starts.long().cumsum(1)
    return q, k, v, dout, doc


def check_case(rank, world, impl, name, group=None, seed=0):
    """Max abs errors of one case on this rank's shard, and the bytes this rank sent."""
    batch, c, hq, hkv, d, causal, docs = CASES[name]
    q, k, v, dout, doc = make_problem(batch, 2 * world * c, hq, hkv, d, docs, seed)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*full, causal, doc)
    ref.backward(dout)
    shard = lambda t: zigzag_shard(t, world, dim=1, rank=rank)  # noqa: E731
    mine = [shard(t).requires_grad_() for t in (q, k, v)]
    COMM_STATS.reset()
    out = IMPLS[impl](*mine, group=group, causal=causal,
                      doc_ids=shard(doc) if doc is not None else None)
    out.backward(shard(dout))
    errors = {"out": (out - shard(ref)).abs().max().item()}
    for key, got, want in zip(("dq", "dk", "dv"), mine, full):
        errors[key] = (got.grad - shard(want.grad)).abs().max().item()
    return {"errors": errors, "bytes": COMM_STATS.snapshot(), "dtype": str(out.dtype)}


def _error_message(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def error_cases(rank, world, impl):
    """Messages raised for bad inputs (None if nothing was raised)."""
    attn = IMPLS[impl]
    t = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    s = 6 if rank == 0 else 8  # unequal shard lengths across ranks
    return {
        "unequal": _error_message(lambda: attn(t(1, s, 2, 4), t(1, s, 2, 4), t(1, s, 2, 4))),
        "odd": _error_message(lambda: attn(t(1, 5, 2, 4), t(1, 5, 2, 4), t(1, 5, 2, 4))),
        "heads": _error_message(lambda: attn(t(1, 4, 3, 4), t(1, 4, 2, 4), t(1, 4, 2, 4))),
        "head_dim": _error_message(lambda: attn(t(1, 4, 2, 8), t(1, 4, 2, 4), t(1, 4, 2, 4))),
    }


def run_cases(rank, world, impl):
    """Every case on the world group, the error checks, a size-1 group and (world 4) pairs."""
    result = {name: check_case(rank, world, impl, name) for name in CASES}
    result["errors"] = error_cases(rank, world, impl)
    singles = [dist.new_group([r]) for r in range(world)]  # collective: all ranks make all
    result["single"] = check_case(0, 1, impl, "causal_docs_gqa", group=singles[rank])
    if world == 4:  # two independent rings of 2 on sub-groups: global vs group ranks
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        sub = rank % 2
        result["pairs"] = check_case(sub, 2, impl, "causal_gqa", group=pairs[rank // 2],
                                     seed=rank // 2)
    return result


TOL = 1e-10


def assert_matches_reference(results):
    """Every case, on every rank, within TOL of the fp64 naive attention (out and grads)."""
    for rank, res in enumerate(results):
        for name in [*CASES, "single", "pairs"]:
            if name not in res:
                continue
            assert res[name]["dtype"] == "torch.float64"
            for key, err in res[name]["errors"].items():
                assert err < TOL, f"rank {rank} case {name}: {key} error {err:.3g} >= {TOL}"


def assert_bytes_match_formula(results, impl, world):
    """Bytes summed over ranks equal comm.expected_bytes for every case, per phase/direction."""
    from kiln.parallel.comm import expected_bytes

    for name, (batch, c, hq, hkv, d, causal, docs) in CASES.items():
        want = expected_bytes(impl, world=world, batch=batch, s_local=2 * c, hq=hq, hkv=hkv,
                              head_dim=d, itemsize=8, acc_itemsize=8, causal=causal,
                              doc_itemsize=8 if docs else 0)
        for phase in ("fwd", "bwd"):
            for direction in ("forward", "backward"):
                got = sum(r[name]["bytes"][phase][direction] for r in results)
                assert got == want[phase][direction], (name, phase, direction, got, want)
    single = results[0]["single"]["bytes"]
    assert all(v == 0 for p in ("fwd", "bwd") for v in single[p].values())
