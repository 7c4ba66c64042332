"""The routing profiler against counts made by hand from known routes (single process), the
measured placement metrics on a toy, and the W&B heatmap helper in offline mode."""
import numpy as np
import pytest
import torch
from torch import nn

from kiln.parallel.routing import (RoutingProfiler, latest_profile, placement_quality, save_profile,
                                   wandb_heatmaps)
from kiln.parallel.placement.io import RoutingProfile
from kiln.model.moe import MoE, MoEConfig
from tests.parallel.fixed_router import Fixed

E = 3


def _net(routes):
    net = nn.Module()
    net.layers = nn.ModuleList(MoE(4, 6, MoEConfig(num_experts=E, top_k=2)) for _ in routes)
    for b, r in zip(net.layers, routes):
        b.router = Fixed(r, E)
    return net


def _run(net, x):
    for b in net.layers:
        x = x + b(x)


def test_counts_match_hand_computation():
    routes = [[[0, 1], [2, 0]], [[1, 2], [0, E]], [[2, 1], [1, 0]]]  # token 1 drops a choice in layer 1
    net = _net(routes)
    prof = RoutingProfiler(net)
    _run(net, torch.randn(2, 4))
    _run(net, torch.randn(2, 4))  # two steps add up
    p = prof.snapshot("profile")
    load = np.zeros((3, E))
    trans = np.zeros((2, E, E))
    for l, r in enumerate(routes):
        for tok in r:
            for e in tok:
                if e < E:
                    load[l, e] += 2
    for l in range(2):
        for a, b in zip(routes[l], routes[l + 1]):
            for e in a:
                for f in b:
                    if e < E and f < E:
                        trans[l, e, f] += 2
    assert p.tokens == 4 and p.top_k == 2
    np.testing.assert_array_equal(p.load, load)
    np.testing.assert_array_equal(p.transitions, trans)
    assert prof.snapshot("profile") is None            # reset after the snapshot
    assert prof.snapshot("metrics").tokens == 4        # the other window is independent
    prof.active = False
    _run(net, torch.randn(2, 4))
    assert prof.snapshot("metrics") is None


def test_placement_quality_by_hand(tmp_path):
    load = np.array([[30.0, 10.0, 20.0, 40.0], [25.0, 25.0, 25.0, 25.0]])
    trans = np.zeros((1, 4, 4))
    trans[0, 0, 0], trans[0, 3, 1], trans[0, 1, 2] = 50, 30, 20
    prof = RoutingProfile(load=load, transitions=trans, tokens=50, top_k=2)
    q = placement_quality(prof, np.array([[0, 0, 1, 1], [0, 1, 0, 1]]), 2)
    assert q["moe/balance/l0"] == pytest.approx(50 / 60)   # ranks hold 40 and 60
    assert q["moe/balance/l1"] == pytest.approx(1.0)
    # pairs staying on one rank: 0->0 (r0->r0) yes; 3->1 (r1->r1) yes; 1->2 (r0->r0) yes
    assert q["moe/cross_rank_frac"] == pytest.approx(0.0)
    q = placement_quality(prof, np.array([[0, 1, 0, 1], [1, 0, 1, 0]]), 2)
    # 0->0: r0->r1 crosses (50); 3->1: r1->r0 crosses (30); 1->2: r1->r1 stays (20)
    assert q["moe/cross_rank_frac"] == pytest.approx(0.8)
    per_expert = placement_quality(prof, None, 0)       # ep = 1: balance over experts
    assert per_expert["moe/balance/l0"] == pytest.approx(25 / 40)
    path = save_profile(prof, tmp_path, step=7)
    assert path.name == "routing_step00000007.npz" and latest_profile(tmp_path).is_file()
    np.testing.assert_array_equal(RoutingProfile.load(str(latest_profile(tmp_path))).load, load)


def test_wandb_heatmaps_offline(tmp_path):
    wandb = pytest.importorskip("wandb")
    prof = RoutingProfile(load=np.ones((2, 3)), transitions=np.ones((1, 3, 3)), tokens=3, top_k=1)
    items = wandb_heatmaps(prof)
    assert {"moe/load", "moe/transition_l0"} <= set(items)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="kiln-test",
                     settings=wandb.Settings(silent=True, console="off"))
    run.log(items, step=1)
    run.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))
