"""Expert placement for expert parallelism: MoETuner's ILP and the baselines it is compared with.

Entry point: ``place(profile, strategy, topo, cost, ...) -> PlacementResult``.

A placement is an int array ``[L, E]``: rank (in [0, R)) holding expert e of MoE layer l. Every
strategy returns a placement that passes ``check_placement``: every rank holds exactly L*E/R
experts over the whole model (memory balance); per-layer counts may differ.

Strategies:
  * ``contiguous``  Megatron's layout, expert e on rank e // (E/R) (needs R | E).
  * ``round_robin`` expert e of layer l on rank (l*E + e) % R (= e % R when R | E).
  * ``greedy_lpt``  per layer, heaviest expert first onto the least-loaded rank that still has a
                    free slot; slots per rank and layer as in round_robin, so memory stays balanced.
  * ``ilp``         MoETuner's two stages: balanced clustering (``stage1_clusters``), then the
                    clusters' placement on ranks chained over layers (``stage2_chain``).
                    ``align=True`` adds kiln's traffic-aware re-clustering within the gap slack;
                    ``max_per_rank_layer=E/R`` forces equal expert counts per rank and layer,
                    which gives up some balance but leaves stage 2 free to keep traffic local.
                    ``refine=True`` adds kiln's stage 3 (``stage3_refine``): single-expert
                    moves and swaps, then a joint MIP on small models, that cut the cross-rank
                    traffic while every layer keeps balancedness >= min(min_balance, its ILP
                    value); never worse than the plain ILP's traffic.
                    ``coselect=True`` (the training objective, needs the profile's co-selection
                    counts) re-clusters each layer after stage 1 so experts chosen together by
                    one token share a rank, every layer keeping balancedness >= min(min_balance,
                    its stage-1 value) (``coselect``): under dedup dispatch that cuts the rows
                    sent. Stage 2 and ``refine`` then cut cross-layer traffic, which only a
                    serving path (tokens staying on the expert's rank) sends.
"""
from __future__ import annotations

import time

import numpy as np

from kiln.parallel.placement.stage2_chain import sigma_to_placement, stage2_chain
from kiln.parallel.placement.stage1_clusters import check_feasible, stage1_clusters
from kiln.parallel.placement.io import (PlacementError, PlacementResult, RoutingProfile,
                                        check_placement, synthetic_profile)
from kiln.parallel.placement.metrics import (CostModel, PlacementMetrics, Topology,
                                             balance_objective, chain_objective, evaluate)
from kiln.parallel.placement.stage3_refine import refine as refine_traffic
from kiln.parallel.placement.coselect import coselect_stage

STRATEGIES = ("contiguous", "round_robin", "greedy_lpt", "ilp")

__all__ = ["STRATEGIES", "PlacementError", "PlacementResult", "RoutingProfile",
           "PlacementMetrics", "Topology", "CostModel", "place", "contiguous", "round_robin",
           "greedy_lpt", "check_placement", "evaluate", "synthetic_profile",
           "balance_objective", "chain_objective"]


def contiguous(L: int, E: int, R: int) -> np.ndarray:
    """Megatron's contiguous layout: expert e on rank e // (E/R) in every layer."""
    if E % R:
        raise PlacementError(f"contiguous placement needs E divisible by R (E={E}, R={R}); "
                             f"use round_robin, greedy_lpt or ilp")
    return np.tile(np.arange(E) // (E // R), (L, 1)).astype(np.int64)


def round_robin(L: int, E: int, R: int) -> np.ndarray:
    """Expert e of layer l on rank (l*E + e) % R: balanced memory whenever R divides L*E."""
    if (L * E) % R:
        raise PlacementError(f"memory balance impossible: L*E = {L * E} experts do not divide "
                             f"over {R} ranks; pick an expert-parallel size dividing {L * E}")
    return ((np.arange(L)[:, None] * E + np.arange(E)[None, :]) % R).astype(np.int64)


def greedy_lpt(load: np.ndarray, R: int) -> np.ndarray:
    """Longest-processing-time per layer with round_robin's per-rank expert counts."""
    L, E = load.shape
    slots = np.stack([np.bincount(row, minlength=R) for row in round_robin(L, E, R)])
    out = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        free, tokens = slots[l].copy(), np.zeros(R)
        for e in np.argsort(-load[l], kind="stable"):
            r = int(np.argmin(np.where(free > 0, tokens, np.inf)))
            out[l, e] = r
            tokens[r] += load[l, e]
            free[r] -= 1
    return out


def solve_ilp(profile: RoutingProfile, topo: Topology, cost: CostModel,
              max_per_rank_layer: int | None = None, time_limit: float = 60.0,
              mip_rel_gap: float = 0.025, align: bool = False, seed: int = 0,
              refine: bool = False, min_balance: float = 0.95, coselect: bool = False):
    """Two-stage MoETuner ILP (+ kiln's stage 3 when ``refine``); returns (placement, info).

    ``info['gap']`` is stage 1's relative gap to the sum of per-layer HiGHS bounds (a valid bound
    of the memory-coupled problem); stage 2's result and a (loose) bound are in info['stage2'];
    stage 3's traffic before/after and, where its joint MIP ran, a lower bound on the traffic of
    any placement under the same balance floor are in info['stage3']; with ``coselect``, the
    co-selection pairs kept on one rank before/after in info['coselect'].
    """
    L, E, R = profile.layers, profile.experts, topo.ranks
    check_feasible(L, E, R, max_per_rank_layer)
    cap = min(max_per_rank_layer or E, E - R + 1)
    t0 = time.perf_counter()
    reserve = 0.5 * time_limit if refine else 0.0     # stage 3's share of the budget
    # Stage 2 is cheap (many R x R assignments); most of the budget goes to the stage-1 MIPs.
    slots, s1 = stage1_clusters(profile.load, profile.transitions if align else None, R, cap,
                                0.85 * (time_limit - reserve), mip_rel_gap, seed=seed)
    cos = None
    if coselect:  # slot sizes per layer are kept, so the memory balance of stage 1 holds
        slots, cos = coselect_stage(profile.load, profile.coselect, slots, R, min_balance, seed)
    link = cost.link_s_per_pair(topo, profile.top_k)
    sigma, s2 = stage2_chain(slots, profile.transitions, R, link, cost.max_pair_weight,
                             topo.node_of(),
                             max(time_limit - reserve - (time.perf_counter() - t0), 0.5))
    p = sigma_to_placement(slots, sigma)
    info = {"gap": s1["gap"], "time_limit_s": time_limit, "mip_rel_gap": mip_rel_gap,
            "align": align, "refine": refine, "stage1": s1, "stage2": s2}
    if cos is not None:
        info["coselect"] = cos
    if refine:
        p, info["stage3"] = refine_traffic(profile.load, profile.transitions, p, link,
                                           topo.node_of(), R, cap, min_balance,
                                           max(time_limit - (time.perf_counter() - t0), 0.5))
    info["solve_time_s"] = time.perf_counter() - t0
    return p, info


def place(profile: RoutingProfile, strategy: str = "ilp", topo: Topology | None = None,
          cost: CostModel | None = None, *, max_per_rank_layer: int | None = None,
          time_limit: float = 60.0, mip_rel_gap: float = 0.025, align: bool = False,
          seed: int = 0, refine: bool = False, min_balance: float = 0.95,
          coselect: bool = False) -> PlacementResult:
    """Place the experts of ``profile`` on ``topo.ranks`` ranks with ``strategy``.

    ``time_limit`` (s), ``mip_rel_gap``, ``align``, ``refine``, ``coselect`` and ``min_balance`` apply to ``ilp``; it returns the best feasible
    placement found in time, with the stage-1 gap in ``result.solver['gap']``. ``align=False`` is
    the paper's balance-only stage 1 (see ``stage1_clusters``).
    Infeasible requests raise PlacementError with one line.
    """
    topo = topo or Topology()
    cost = cost or CostModel()
    topo.validate()
    cost.validate()
    L, E, R = profile.layers, profile.experts, topo.ranks
    if strategy not in STRATEGIES:
        raise PlacementError(f"unknown placement strategy {strategy!r}; use one of {STRATEGIES}")
    if time_limit <= 0:
        raise PlacementError(f"time_limit must be > 0 seconds (got {time_limit})")
    solver: dict = {}
    if strategy == "contiguous":
        p = contiguous(L, E, R)
    elif strategy == "round_robin":
        p = round_robin(L, E, R)
    elif strategy == "greedy_lpt":
        p = greedy_lpt(profile.load, R)
    else:
        check_feasible(L, E, R, max_per_rank_layer)
        if not 0 <= min_balance <= 1:
            raise PlacementError(f"min_balance must lie in [0, 1] (got {min_balance})")
        if coselect and profile.coselect is None:
            raise PlacementError("the routing profile has no co-selection counts (recorded before "
                                 "kiln counted them): re-record it, or place without coselect")
        p, solver = solve_ilp(profile, topo, cost, max_per_rank_layer, time_limit, mip_rel_gap,
                              align, seed, refine, min_balance, coselect)
    p = check_placement(p, L, E, R, max_per_rank_layer, what=f"{strategy} placement")
    metrics = evaluate(profile, p, topo, cost).to_dict()
    metrics["balance_objective_tokens"] = balance_objective(profile, p, R)
    return PlacementResult(placement=p, strategy=strategy, ranks=R, nodes=topo.nodes,
                           metrics=metrics, solver=solver, profile_hash=profile.digest())
