"""Routing profiles, placement checks, baselines, metrics and placement.json (no solver here)."""
import json

import numpy as np
import pytest

from kiln.parallel.placement import (CostModel, PlacementError, PlacementResult, RoutingProfile,
                                     Topology, balance_objective, chain_objective, check_placement,
                                     contiguous, evaluate, greedy_lpt, place, round_robin,
                                     synthetic_profile)


def one_line(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------ profile
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_synthetic_profile_counts_agree(top_k):
    p = synthetic_profile(L=4, E=8, top_k=top_k, tokens=500, zipf_a=1.2, correlation=0.5, seed=3)
    assert p.load.shape == (4, 8) and p.transitions.shape == (3, 8, 8)
    np.testing.assert_array_equal(p.load.sum(1), 500 * top_k)
    np.testing.assert_array_equal(p.transitions.sum((1, 2)), 500 * top_k * top_k)
    for l in range(3):   # k*k pair convention: row sums k * load[l], column sums k * load[l+1]
        np.testing.assert_array_equal(p.transitions[l].sum(1), top_k * p.load[l])
        np.testing.assert_array_equal(p.transitions[l].sum(0), top_k * p.load[l + 1])
    q = synthetic_profile(L=4, E=8, top_k=top_k, tokens=500, zipf_a=1.2, correlation=0.5, seed=3)
    np.testing.assert_array_equal(p.transitions, q.transitions)


def test_synthetic_profile_correlation_and_skew():
    p = synthetic_profile(L=3, E=16, top_k=1, tokens=4000, zipf_a=1.5, correlation=1.0, seed=0)
    for l in range(2):   # every token follows its partner: one target per source expert
        assert ((p.transitions[l] > 0).sum(1) <= 1).all()
    assert np.sort(p.load[0])[::-1][0] > 5 * p.load[0].mean()   # Zipf 1.5: a dominant expert
    u = synthetic_profile(L=3, E=16, top_k=1, tokens=4000, zipf_a=0.0, correlation=0.0, seed=0)
    assert u.load.max() < 1.5 * u.load.mean()                    # zipf 0: uniform popularity
    assert ((u.transitions[0] > 0).sum(1) > 8).all()             # no correlation: spread out


def test_profile_roundtrip_and_errors(tmp_path):
    p = synthetic_profile(L=3, E=4, top_k=2, tokens=100, seed=1)
    path = str(tmp_path / "prof.npz")
    p.save(path)
    q = RoutingProfile.load(path)
    np.testing.assert_array_equal(p.load, q.load)
    np.testing.assert_array_equal(p.transitions, q.transitions)
    assert (q.tokens, q.top_k, q.digest()) == (100, 2, p.digest())
    with pytest.raises(PlacementError) as e:
        RoutingProfile.load(str(tmp_path / "nope.npz"))
    assert "not found" in one_line(e)
    (tmp_path / "bad.npz").write_bytes(b"garbage, not a zip")
    with pytest.raises(PlacementError) as e:
        RoutingProfile.load(str(tmp_path / "bad.npz"))
    assert "corrupt" in one_line(e)
    np.savez(tmp_path / "mismatch.npz", load=np.ones((3, 4)), transitions=np.ones((2, 5, 5)), tokens=4)
    with pytest.raises(PlacementError) as e:
        RoutingProfile.load(str(tmp_path / "mismatch.npz"))
    assert "[L-1, E, E]" in one_line(e)
    np.savez(tmp_path / "partial.npz", load=np.ones((3, 4)))
    with pytest.raises(PlacementError) as e:
        RoutingProfile.load(str(tmp_path / "partial.npz"))
    assert "lacks" in one_line(e)
    with pytest.raises(PlacementError):
        RoutingProfile(load=-np.ones((2, 2)), transitions=np.zeros((1, 2, 2)), tokens=1)
    with pytest.raises(PlacementError):
        p.save(str(tmp_path / "missing_dir" / "p.npz"))


# ------------------------------------------------------------------------- placement checks
def test_check_placement_errors():
    ok = round_robin(2, 4, 2)
    np.testing.assert_array_equal(check_placement(ok, 2, 4, 2), ok)
    cases = [(np.zeros((2, 3), int), "shape"), (ok + 5, "outside"), (ok * 0.5, "non-integer"),
             (np.array([[0, 0, 0, 1], [0, 1, 0, 1]]), "not memory balanced")]
    for bad, what in cases:
        with pytest.raises(PlacementError) as e:
            check_placement(bad, 2, 4, 2)
        assert what in one_line(e)
    with pytest.raises(PlacementError) as e:
        check_placement(np.array([[0, 0, 0, 1], [1, 1, 1, 0]]), 2, 4, 2, max_per_rank_layer=2)
    assert "max_per_rank_layer" in one_line(e)
    with pytest.raises(PlacementError) as e:
        check_placement(np.zeros((3, 6), int), 3, 6, 4)
    assert "do not divide" in one_line(e)


def test_baselines():
    np.testing.assert_array_equal(contiguous(2, 8, 4)[1], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(round_robin(2, 8, 4)[0], [0, 1, 2, 3, 0, 1, 2, 3])
    with pytest.raises(PlacementError) as e:
        contiguous(2, 6, 4)
    assert "round_robin" in one_line(e)
    check_placement(round_robin(2, 6, 4), 2, 6, 4)            # 12 experts over 4 ranks, rotated
    p = synthetic_profile(L=4, E=16, top_k=2, tokens=2000, zipf_a=1.2, seed=2)
    g = greedy_lpt(p.load, 4)
    check_placement(g, 4, 16, 4)
    assert balance_objective(p, g, 4) < balance_objective(p, contiguous(4, 16, 4), 4)
    for s in ("contiguous", "round_robin", "greedy_lpt"):
        r = place(p, s, Topology(4, 2))
        assert r.strategy == s and r.solver == {} and 0 < r.metrics["balancedness_min"] <= 1
    with pytest.raises(PlacementError) as e:
        place(p, "magic", Topology(4))
    assert "unknown placement strategy" in one_line(e)


# ---------------------------------------------------------------------------------- metrics
def toy():
    """Two layers, four experts, top-1; see the hand computation in the test below."""
    load = np.array([[4, 2, 1, 1], [3, 3, 1, 1]], float)
    t0 = np.array([[2, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]], float)
    return RoutingProfile(load=load, transitions=t0[None], tokens=8, top_k=1)


UNIT = dict(hidden=1, ffn_hidden=1, bytes_per_elem=1, flops_per_s=6.0, intra_bw=1.0, inter_bw=0.5)


def test_metrics_hand_computed_toy():
    prof, P = toy(), np.array([[0, 0, 1, 1], [0, 1, 0, 1]])
    # rank loads: layer 0 (6, 2) -> mean/max 4/6; layer 1 (4, 4) -> 1.
    # rank traffic l0 -> l1: r0->r0 3, r0->r1 3, r1->r0 1, r1->r1 1: 4 of 8 pairs cross ranks.
    cost = CostModel(**UNIT, max_pair_weight=8.0)    # 1 s per token-choice, 1 s per sent pair
    m = evaluate(prof, P, Topology(2, 1), cost)
    np.testing.assert_allclose(m.balancedness, [4 / 6, 1.0])
    assert m.balancedness_mean == pytest.approx(5 / 6) and m.balancedness_min == pytest.approx(4 / 6)
    assert m.cross_rank_fraction == pytest.approx(0.5) and m.inter_node_fraction == 0.0
    # layer 0: compute only, max(6, 2) = 6; layer 1: r0 = 4 + 3 sent = 7, r1 = 4 + 1 = 5.
    np.testing.assert_allclose(m.layer_time_s, [6.0, 7.0])
    assert m.step_time_s == pytest.approx(13.0) and m.comm_time_s == pytest.approx(3.0)
    # stage-2 cost: pair costs [[0, 3], [1, 0]]: sum 4 + 8 * max 3 = 28.
    assert m.chain_cost_s == pytest.approx(28.0)
    assert chain_objective(prof, P, Topology(2, 1), cost) == pytest.approx(28.0)
    assert balance_objective(prof, P, 2) == pytest.approx(4.0)    # |6-4| + |2-4| + 0 + 0
    # Two nodes of one rank: every cross-rank pair is inter-node at half the bandwidth.
    m2 = evaluate(prof, P, Topology(2, 2), CostModel(**UNIT))
    assert m2.inter_node_fraction == pytest.approx(0.5)
    np.testing.assert_allclose(m2.layer_time_s, [6.0, 4 + 3 * 2.0])


def test_metrics_top_k_splits_vector_over_sources():
    # top-2: the k*k pairs carry 1/k of a hidden vector each, so traffic time halves.
    prof = toy()
    prof2 = RoutingProfile(load=prof.load * 2, transitions=prof.transitions * 4, tokens=8, top_k=2)
    P = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])
    m = evaluate(prof2, P, Topology(2, 1), CostModel(**UNIT))
    np.testing.assert_allclose(m.layer_time_s, [12.0, 8 + 12 / 2])
    assert m.cross_rank_fraction == pytest.approx(0.5)


# --------------------------------------------------------------------------- placement.json
def test_placement_json_roundtrip_and_validation(tmp_path):
    prof = synthetic_profile(L=2, E=4, top_k=1, tokens=50, seed=0)
    r = place(prof, "greedy_lpt", Topology(2, 1))
    path = str(tmp_path / "placement.json")
    r.to_json(path)
    back = PlacementResult.from_json(path, L=2, E=4, R=2)
    np.testing.assert_array_equal(back.placement, r.placement)
    assert back.profile_hash == prof.digest() and back.strategy == "greedy_lpt"
    assert back.metrics["balancedness_mean"] == pytest.approx(r.metrics["balancedness_mean"])
    for kw, what in [(dict(R=4), "for 2 ranks"), (dict(L=3, E=4), "shape"), (dict(E=8), "shape")]:
        with pytest.raises(PlacementError) as e:
            PlacementResult.from_json(path, **kw)
        assert what in one_line(e)
    doc = json.loads(open(path).read())
    doc["placement"] = [[0, 0, 0, 0], [1, 1, 1, 0]]
    (tmp_path / "unbalanced.json").write_text(json.dumps(doc))
    with pytest.raises(PlacementError) as e:
        PlacementResult.from_json(str(tmp_path / "unbalanced.json"))
    assert "memory balanced" in one_line(e)
    (tmp_path / "corrupt.json").write_text("{not json")
    with pytest.raises(PlacementError) as e:
        PlacementResult.from_json(str(tmp_path / "corrupt.json"))
    assert "corrupt" in one_line(e)
    with pytest.raises(PlacementError) as e:
        PlacementResult.from_json(str(tmp_path / "absent.json"))
    assert "not found" in one_line(e)
