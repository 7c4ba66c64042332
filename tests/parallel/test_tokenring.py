"""TokenRing against single-device fp64 attention on real gloo ranks (2 and 4), forward and
backward; communication counts against the closed form; errors; fallbacks; load balance."""
import pytest

from kiln.parallel.comm import COMM_STATS
from kiln.parallel.ring_common import contiguous_work, schedule_flops, schedule_work
from kiln.parallel.tokenring import tokenring_attention
from tests.dist import run_ranks
from tests.parallel.sp_cases import (assert_bytes_match_formula, assert_matches_reference,
                                     make_problem, naive_attention, run_cases)


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def world_results(request):
    """One spawn per world size runs every case (spawning is the slow part)."""
    return request.param, run_ranks(run_cases, request.param, "tokenring", timeout=240)


@pytest.mark.slow
def test_matches_fp64_reference(world_results):
    assert_matches_reference(world_results[1])


@pytest.mark.slow
def test_bytes_match_formula_and_use_both_directions(world_results):
    world, results = world_results
    assert_bytes_match_formula(results, "tokenring", world)
    for phase in ("fwd", "bwd"):  # Q one way, partials the other: both directions busy
        assert all(results[0]["causal_mha"]["bytes"][phase][d] > 0 for d in ("forward", "backward"))


@pytest.mark.slow
def test_bad_inputs_raise_clear_errors(world_results):
    for errors in (r["errors"] for r in world_results[1]):
        assert "differ across ranks" in errors["unequal"]
        assert "odd" in errors["odd"] and "zigzag" in errors["odd"]
        assert "not a multiple of kv heads" in errors["heads"]
        assert "head dims differ" in errors["head_dim"]


def test_without_torch_distributed_is_local_attention():
    q, k, v, dout, doc = make_problem(2, 10, 4, 2, 6, True, seed=1)
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    COMM_STATS.reset()
    out = tokenring_attention(*qs, causal=True, doc_ids=doc)
    ref = naive_attention(q, k, v, True, doc)
    assert (out - ref).abs().max() < 1e-12
    assert COMM_STATS.snapshot()["fwd"] == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_schedule_is_balanced_and_complete(world):
    s_local = 2 * 5
    s = world * s_local
    for impl in ("tokenring", "ring"):
        work = schedule_work(world, s_local, impl)
        assert len(set(work)) == 1  # imbalance max/mean = 1.00
        assert sum(work) == s * (s + 1) // 2  # exactly the visible causal pairs, none twice
    flops = schedule_flops(world, s_local, heads=4, head_dim=8)
    assert flops[0] == 4 * 4 * 8 * work[0]
    contiguous = contiguous_work(world, s_local)
    assert sum(contiguous) == s * (s + 1) // 2 and max(contiguous) > max(work)
