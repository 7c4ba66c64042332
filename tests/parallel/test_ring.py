"""Ring Attention baseline against single-device fp64 attention on real gloo ranks (2 and 4),
forward and backward; communication counts against the closed form; errors."""
import pytest

from kiln.parallel.ring import ring_attention
from tests.dist import run_ranks
from tests.parallel.sp_cases import (assert_bytes_match_formula, assert_matches_reference,
                                     make_problem, naive_attention, run_cases)


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def world_results(request):
    return request.param, run_ranks(run_cases, request.param, "ring", timeout=240)


@pytest.mark.slow
def test_matches_fp64_reference(world_results):
    assert_matches_reference(world_results[1])


@pytest.mark.slow
def test_bytes_match_formula_one_direction_only(world_results):
    world, results = world_results
    assert_bytes_match_formula(results, "ring", world)
    for phase in ("fwd", "bwd"):
        assert all(r["causal_mha"]["bytes"][phase]["forward"] == 0 for r in results)


@pytest.mark.slow
def test_bad_inputs_raise_clear_errors(world_results):
    for errors in (r["errors"] for r in world_results[1]):
        assert "differ across ranks" in errors["unequal"]
        assert "odd" in errors["odd"]
        assert "not a multiple of kv heads" in errors["heads"]
        assert "head dims differ" in errors["head_dim"]


def test_without_torch_distributed_is_local_attention():
    q, k, v, _, _ = make_problem(1, 8, 2, 2, 5, False, seed=2)
    out = ring_attention(q, k, v, causal=False)
    assert (out - naive_attention(q, k, v, False)).abs().max() < 1e-12
