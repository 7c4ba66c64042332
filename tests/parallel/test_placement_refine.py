"""kiln's stage 3 (parallel/placement/stage3_refine.py): constraints, never worse than the plain ILP, and equal to a
brute-force optimum over every valid placement on instances small enough to enumerate."""
import itertools

import numpy as np
import pytest

from kiln.parallel.placement import (CostModel, PlacementError, Topology, check_placement, evaluate,
                                     place, synthetic_profile)
from kiln.parallel.placement.stage3_refine import layer_caps, refine, refine_local, traffic

# (L, E, R, nodes): R^(L*E) <= 531441 placements to enumerate.
TINY = [(2, 4, 2, 1), (3, 4, 2, 1), (2, 6, 3, 1), (2, 4, 4, 2), (2, 8, 2, 2)]


def rank_loads(load, p, R):
    return np.stack([np.bincount(p[l], weights=load[l], minlength=R) for l in range(len(p))])


def balancedness(load, p, R):
    rl = rank_loads(load, p, R)
    return rl.mean(1) / rl.max(1)


def brute_traffic(prof, R, link, caps, cap):
    """Least traffic over every placement with memory balance, 1..cap per rank and layer, and
    every layer's max rank load <= caps[l]."""
    L, E = prof.layers, prof.experts
    grid = np.array(list(itertools.product(range(R), repeat=L * E)), dtype=np.int8).reshape(-1, L, E)
    per_layer = np.stack([(grid == r).sum(2) for r in range(R)], -1)               # [N, L, R]
    ok = (per_layer.sum(1) == L * E // R).all(1) & (per_layer >= 1).all((1, 2)) \
        & (per_layer <= cap).all((1, 2))
    for l in range(L):
        loads = np.stack([np.where(grid[:, l] == r, prof.load[l], 0).sum(1) for r in range(R)], -1)
        ok &= (loads <= caps[l]).all(1)
    g = grid[ok].astype(np.int64)
    cost = sum((prof.transitions[l][None] * link[g[:, l, :, None], g[:, l + 1, None, :]]).sum((1, 2))
               for l in range(L - 1))
    return cost.min(), len(g)


def setup(L, E, R, nodes, seed, top_k=2, corr=0.8):
    prof = synthetic_profile(L, E, top_k, 400, 1.1, corr, seed)
    topo = Topology(R, nodes)
    link = CostModel().link_s_per_pair(topo, prof.top_k)
    plain = place(prof, "ilp", topo, CostModel(), time_limit=5.0)
    return prof, topo, link, plain


@pytest.mark.parametrize("L,E,R,nodes", TINY)
@pytest.mark.parametrize("seed", [0, 1])
def test_refine_equals_brute_force(L, E, R, nodes, seed):
    prof, topo, link, plain = setup(L, E, R, nodes, seed, top_k=1 + seed % 2)
    cap = E - R + 1
    for min_balance in (0.95, 0.8):
        caps = layer_caps(prof.load, plain.placement, R, min_balance)
        p, info = refine(prof.load, prof.transitions, plain.placement, link, topo.node_of(), R,
                         cap, min_balance, time_limit=20.0)
        check_placement(p, L, E, R)
        # The balance floor: no layer below min(min_balance, its ILP value).
        floor = np.minimum(min_balance, balancedness(prof.load, plain.placement, R))
        assert (balancedness(prof.load, p, R) >= floor - 1e-9).all()
        got = traffic(prof.transitions, p, link)
        assert got <= traffic(prof.transitions, plain.placement, link) * (1 + 1e-12)
        best, n = brute_traffic(prof, R, link, caps, cap)
        assert n > 0
        assert got == pytest.approx(best, rel=1e-6, abs=1e-15), (min_balance, info)
        # The reported lower bound is valid and tight here.
        assert info["bound"] <= best * (1 + 1e-6) + 1e-15
        assert info["gap"] <= 1e-3


def test_local_search_keeps_constraints_and_never_worsens():
    prof = synthetic_profile(8, 16, 2, 3000, 1.2, 0.7, 3)
    topo = Topology(4, 2)
    link = CostModel().link_s_per_pair(topo, 2)
    plain = place(prof, "ilp", topo, CostModel(), time_limit=5.0)
    for min_balance in (0.99, 0.9):
        caps = layer_caps(prof.load, plain.placement, 4, min_balance)
        p, moves, _ = refine_local(prof.load, prof.transitions, plain.placement, link, 4, caps,
                                   13, time_limit=5.0)
        check_placement(p, 8, 16, 4)
        assert (rank_loads(prof.load, p, 4).max(1) <= caps).all()
        before = traffic(prof.transitions, plain.placement, link)
        after = traffic(prof.transitions, p, link)
        assert after <= before * (1 + 1e-12)
        if moves:
            assert after < before


def test_place_refine_option():
    prof = synthetic_profile(4, 8, 2, 2000, 1.0, 0.8, 5)
    topo = Topology(2, 1)
    plain = place(prof, "ilp", topo, time_limit=5.0)
    ref = place(prof, "ilp", topo, time_limit=10.0, refine=True, min_balance=0.95)
    s3 = ref.solver["stage3"]
    assert ref.metrics["cross_rank_fraction"] <= plain.metrics["cross_rank_fraction"] + 1e-12
    floor = np.minimum(0.95, np.array(plain.metrics["balancedness"]))
    assert (np.array(ref.metrics["balancedness"]) >= floor - 1e-9).all()
    assert s3["traffic_after"] <= s3["traffic_before"]
    assert s3["bound"] is not None and s3["bound"] <= s3["traffic_after"] * (1 + 1e-9)
    m = evaluate(prof, ref.placement, topo)
    assert m.cross_rank_fraction == pytest.approx(ref.metrics["cross_rank_fraction"])
    with pytest.raises(PlacementError, match="min_balance"):
        place(prof, "ilp", topo, refine=True, min_balance=1.5)


def test_refine_with_per_layer_cap():
    prof = synthetic_profile(3, 4, 2, 400, 1.1, 0.9, 7)
    topo = Topology(2, 1)
    link = CostModel().link_s_per_pair(topo, 2)
    plain = place(prof, "ilp", topo, time_limit=5.0, max_per_rank_layer=2)
    caps = layer_caps(prof.load, plain.placement, 2, 0.9)
    p, _ = refine(prof.load, prof.transitions, plain.placement, link, topo.node_of(), 2, 2, 0.9,
                  time_limit=10.0)
    check_placement(p, 3, 4, 2, max_per_rank_layer=2)
    best, _ = brute_traffic(prof, 2, link, caps, 2)
    assert traffic(prof.transitions, p, link) == pytest.approx(best, rel=1e-6)
