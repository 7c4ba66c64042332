"""Co-selection: the profile's counts (profiler by hand, files old and new), the training
objective of placement (place(..., coselect=True)) and the stage-2 bound's validity."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from kiln.model.moe import MoE, MoEConfig
from kiln.parallel.placement import (PlacementError, RoutingProfile, Topology, check_placement, place,
                                     synthetic_profile)
from kiln.parallel.placement.coselect import coselect_layer, kept_pairs, swap_search
from kiln.parallel.placement.metrics import CostModel
from kiln.parallel.placement.stage1_clusters import stage1_clusters
from kiln.parallel.placement.stage2_chain import stage2_chain
from kiln.parallel.routing import RoutingProfiler
from tests.parallel.fixed_router import Fixed

E = 4


def test_profiler_counts_co_selection_by_hand():
    routes = [[[0, 1, 2], [3, 0, E]], [[1, 2, 3], [2, 1, 0]]]      # a dropped choice in layer 0
    net = nn.Module()
    net.layers = nn.ModuleList(MoE(4, 6, MoEConfig(num_experts=E, top_k=3)) for _ in routes)
    for b, r in zip(net.layers, routes):
        b.router = Fixed(r, E)
    prof = RoutingProfiler(net)
    x = torch.randn(2, 4)
    for b in net.layers:
        x = x + b(x)
    p = prof.snapshot("profile")
    want = np.zeros((2, E, E))
    for l, r in enumerate(routes):
        for tok in r:
            for a, b in itertools.permutations([e for e in tok if e < E], 2):
                want[l, a, b] += 1
    np.testing.assert_array_equal(p.coselect, want)


def test_profiles_without_co_selection_still_load_and_keep_their_digest(tmp_path):
    prof = synthetic_profile(L=3, E=8, top_k=2, tokens=500, seed=1)
    old = RoutingProfile(load=prof.load, transitions=prof.transitions, tokens=prof.tokens, top_k=2)
    path = tmp_path / "old.npz"
    with open(path, "wb") as f:  # the file format before co-selection counts
        np.savez(f, load=old.load, transitions=old.transitions, tokens=np.int64(old.tokens),
                 top_k=np.int64(2), format=np.array("kiln-routing-profile-v1"))
    back = RoutingProfile.load(str(path))
    assert back.coselect is None and back.digest() == old.digest()
    new = tmp_path / "new.npz"
    prof.save(str(new))
    back = RoutingProfile.load(str(new))
    np.testing.assert_array_equal(back.coselect, prof.coselect)
    assert back.digest() == prof.digest() != old.digest()
    with pytest.raises(PlacementError, match="no co-selection counts"):
        place(old, "ilp", Topology(2), time_limit=2, coselect=True)
    with pytest.raises(PlacementError, match="coselect must be"):
        RoutingProfile(load=prof.load, transitions=prof.transitions, tokens=500, top_k=2,
                       coselect=np.zeros((3, 8, 7)))


@pytest.mark.parametrize("k", [2, 3])
def test_synthetic_co_selection_follows_the_counting_convention(k):
    p = synthetic_profile(L=3, E=12, top_k=k, tokens=3000, zipf_a=0.8, seed=2, together=0.8, group=4)
    C = p.coselect
    np.testing.assert_array_equal(C, C.transpose(0, 2, 1))
    assert (np.diagonal(C, axis1=1, axis2=2) == 0).all()
    np.testing.assert_array_equal(C.sum(2), (k - 1) * p.load)    # each choice pairs with k-1 others
    assert C.sum() == 3 * 3000 * k * (k - 1)


def test_swap_search_ends_where_no_single_swap_helps():
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = rng.random(9) + 0.2
        C = rng.integers(0, 20, (9, 9)).astype(float)
        C = C + C.T
        np.fill_diagonal(C, 0)
        start = np.repeat(np.arange(3), 3)
        cap = max(np.bincount(start, w, 3).max(), w.sum() / 3 * 1.1)
        s = swap_search(w, C, start, 3, cap)
        assert sorted(np.bincount(s, minlength=3)) == [3, 3, 3] and np.bincount(s, w, 3).max() <= cap + 1e-12
        base = kept_pairs(C, s)
        for e, f in itertools.combinations(range(9), 2):           # brute force: a local optimum
            t = s.copy()
            t[e], t[f] = t[f], t[e]
            if s[e] != s[f] and np.bincount(t, w, 3).max() <= cap:
                assert kept_pairs(C, t) <= base + 1e-9


def test_coselect_layer_keeps_sizes_and_the_balance_floor():
    p = synthetic_profile(L=2, E=16, top_k=2, tokens=4000, zipf_a=0.5, seed=3, together=0.8, group=4)
    slots = np.tile(np.arange(4).repeat(4), 1)
    for l in range(2):
        w = p.load[l]
        s = coselect_layer(w, p.coselect[l], slots, 4, 0.95)
        loads = np.bincount(s, w, 4)
        start_bal = w.sum() / 4 / np.bincount(slots, w, 4).max()
        assert loads.mean() / loads.max() >= min(0.95, start_bal) - 1e-12
        assert (np.bincount(s, minlength=4) == 4).all()
        assert kept_pairs(p.coselect[l], s) >= kept_pairs(p.coselect[l], slots)


def test_coselect_placement_keeps_co_selected_experts_together_within_balance():
    p = synthetic_profile(L=4, E=32, top_k=2, tokens=10000, zipf_a=0.5, correlation=0.2, seed=1,
                          together=0.8, group=8)
    contiguous = place(p, "contiguous", Topology(4))
    plain = place(p, "ilp", Topology(4), time_limit=10)
    co = place(p, "ilp", Topology(4), time_limit=10, coselect=True, min_balance=0.95)
    check_placement(co.placement, 4, 32, 4)
    assert co.metrics["balancedness_min"] >= 0.95
    kept = {n: r.metrics["coselect_kept_fraction"] for n, r in
            (("contiguous", contiguous), ("ilp", plain), ("co", co))}
    # top-2: rows per token and layer = 2 - kept; >= 20% fewer than contiguous on this profile
    assert (2 - kept["co"]) <= 0.8 * (2 - kept["contiguous"]), kept
    assert kept["co"] > kept["ilp"] + 0.2, kept
    info = co.solver["coselect"]
    assert info["kept_fraction"] == pytest.approx(kept["co"])


def test_relaxed_stage2_bound_is_below_the_exact_memory_balanced_optimum():
    cost = CostModel(max_pair_weight=8.0)
    for seed in range(4):
        prof = synthetic_profile(L=3, E=6, top_k=2, tokens=300, zipf_a=1.2, correlation=0.6, seed=seed)
        topo = Topology(3)
        slots, _ = stage1_clusters(prof.load, None, 3, 4, 5.0, 0.0)
        link = cost.link_s_per_pair(topo, 2)
        _, exact = stage2_chain(slots, prof.transitions, 3, link, 8.0, topo.node_of(), 5.0)
        _, local = stage2_chain(slots, prof.transitions, 3, link, 8.0, topo.node_of(), 5.0, exhaustive=False)
        assert exact["bound_of"].startswith("exact") and local["bound_of"].startswith("a lower bound")
        assert local["bound_s"] <= exact["objective_s"] * (1 + 1e-9)
        assert exact["objective_s"] <= local["objective_s"] * (1 + 1e-9)
