"""Expert placement (MoETuner ILP) against contiguous, round-robin and greedy LPT.

Prints, for one node (8 ranks) and two nodes (2 x 4 ranks): balancedness (mean/max tokens per
rank), the fraction of consecutive-layer transitions that cross ranks / nodes, the modelled step
time (docs/moe.md has the model) with its ratio to Megatron's contiguous placement, and the ILP's
solve time and stage-1 gap. Profiles are synthetic Zipf traces with cross-layer correlation unless
--profile names a RoutingProfile .npz, or --run a kiln run whose latest routing profile is used
(real traces: `kiln train recipes/moe_tiny.yaml`, then `kiln profile-routing runs/moe_tiny`).
--a2a also measures kiln's expert-parallel all-to-all on gloo for each one-node placement
(bench/placement_a2a.py).

    .venv/bin/python bench/placement.py                      # 16 layers x 64 experts, top-2
    .venv/bin/python bench/placement.py --zipf 0.8 --correlation 0.5
    .venv/bin/python bench/placement.py --run runs/moe_tiny --ranks 4 --a2a
    .venv/bin/python bench/placement.py --profile runs/x/routing.npz --out placement.json
"""
import argparse
import sys
import time
from pathlib import Path

from kiln.parallel.placement import (CostModel, PlacementError, RoutingProfile, Topology, place,
                                     synthetic_profile)

# ilp = MoETuner's two stages; +align = kiln's traffic-aware re-clustering; eq = equal expert
# counts per rank and layer (max_per_rank_layer = E/R), which frees stage 2 and the alignment;
# +refine = kiln's stage 3 (expert moves + joint MIP under the balance floor --min-balance);
# +coselect = the training objective under dedup dispatch (experts chosen together share a rank).
ROWS = [("contiguous", "contiguous", {}), ("round_robin", "round_robin", {}),
        ("greedy_lpt", "greedy_lpt", {}), ("ilp", "ilp", {"align": False}),
        ("ilp+refine", "ilp", {"refine": True}), ("ilp+coselect", "ilp", {"coselect": True}),
        ("ilp+align", "ilp", {"align": True}), ("ilp eq+align", "ilp", {"align": True, "eq": True})]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", help="RoutingProfile .npz to place (default: synthetic)")
    ap.add_argument("--run", help="kiln run dir: place its profiles/routing_latest.npz (real trace)")
    ap.add_argument("--a2a", action="store_true", help="measure the all-to-all on gloo per placement")
    ap.add_argument("--a2a-tokens", type=int, default=2048, help="tokens per rank for --a2a")
    ap.add_argument("--a2a-dim", type=int, default=256, help="hidden size for --a2a")
    ap.add_argument("--a2a-ffn", type=int, default=512, help="expert hidden size for --a2a")
    ap.add_argument("--a2a-steps", type=int, default=30, help="measured steps per case for --a2a")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=50000)
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of expert popularity")
    ap.add_argument("--correlation", type=float, default=0.7,
                    help="probability a token's choice moves to the partner expert next layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=60.0, help="ILP budget in seconds")
    ap.add_argument("--gap", type=float, default=0.025, help="ILP stage-1 target gap")
    ap.add_argument("--max-pair-weight", type=float, default=8.0)
    ap.add_argument("--min-balance", type=float, default=0.95,
                    help="ilp+refine: each layer keeps balancedness >= min(this, its ILP value)")
    ap.add_argument("--quick", action="store_true", help="only the baselines, ilp and ilp+refine")
    ap.add_argument("--out", help="write the ILP placement.json of the last topology here")
    a = ap.parse_args(argv)
    if a.run:
        a.profile = str(Path(a.run) / "profiles" / "routing_latest.npz")
    try:
        if a.profile:
            prof = RoutingProfile.load(a.profile)
            src = f"profile {a.profile}"
        else:
            prof = synthetic_profile(a.layers, a.experts, a.top_k, a.tokens, a.zipf, a.correlation,
                                     a.seed)
            src = (f"synthetic: zipf {a.zipf}, correlation {a.correlation}, top-{a.top_k}, "
                   f"{a.tokens} tokens, seed {a.seed}")
    except PlacementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cost = CostModel(max_pair_weight=a.max_pair_weight)
    print(f"{prof.layers} MoE layers x {prof.experts} experts, {src}")
    print(f"cost model: hidden {cost.hidden}, ffn {cost.ffn_hidden}, {cost.flops_per_s / 1e12:.0f} "
          f"TFLOP/s, intra {cost.intra_bw / 1e9:.0f} GB/s, inter {cost.inter_bw / 1e9:.0f} GB/s")
    rows = [r for r in ROWS if not (a.quick and "align" in r[0])]
    last, one_node, ilp_x = None, {}, None
    for nodes in (1, 2):
        topo = Topology(a.ranks, nodes)
        print(f"\n== {a.ranks} ranks on {nodes} node{'s' if nodes > 1 else ''}")
        print(f"{'strategy':<12} {'bal mean':>8} {'bal min':>8} {'x-rank':>7} {'x-node':>7} "
              f"{'step ms':>8} {'speedup':>8} {'comm ms':>8} {'a2a cost':>9} {'solve s':>8} "
              f"{'gap':>7}")
        base = None
        for name, strategy, kw in rows:
            t0 = time.perf_counter()
            kw = dict(kw)
            cap = -(-prof.experts // a.ranks) if kw.pop("eq", False) else None
            try:
                if kw.get("refine") or kw.get("coselect"):
                    kw["min_balance"] = a.min_balance
                r = place(prof, strategy, topo, cost, time_limit=a.time_limit, mip_rel_gap=a.gap,
                          max_per_rank_layer=cap, seed=a.seed, **kw)
            except PlacementError as e:
                print(f"{name:<12} n/a ({e})")
                continue
            dt = time.perf_counter() - t0
            if nodes == 1 and name not in ("ilp+align", "ilp eq+align"):
                one_node[name] = r.placement
            m = r.metrics
            base = base or m
            gap = f"{r.solver['gap']:.4f}" if r.solver else "-"
            print(f"{name:<12} {m['balancedness_mean']:8.3f} {m['balancedness_min']:8.3f} "
                  f"{m['cross_rank_fraction']:7.3f} {m['inter_node_fraction']:7.3f} "
                  f"{m['step_time_s'] * 1e3:8.2f} {base['step_time_s'] / m['step_time_s']:7.2f}x "
                  f"{m['comm_time_s'] * 1e3:8.2f} {m['chain_cost_s'] / base['chain_cost_s']:8.2f}x "
                  f"{dt if r.solver else 0:8.1f} {gap:>7}")
            if r.solver:
                s1, s2 = r.solver["stage1"], r.solver["stage2"]
                print(f"{'':<12} stage 1: balance {s1['objective']:.4f} vs bound {s1['bound']:.4f} "
                      f"mean-rank-loads (abs gap {s1['abs_gap_tokens']:.0f} token-choices), "
                      f"{s1['time_s']:.1f}s; stage 2: {s2['objective_s'] * 1e3:.2f} ms "
                      f"(chain start {s2['forward_chain_s'] * 1e3:.2f}, {s2['moves']} moves), "
                      f"{s2['time_s']:.1f}s")
                s3 = r.solver.get("stage3")
                if s3:
                    j = s3["joint"] or {}
                    rel = s3["bound"] / s3["traffic_before"] if s3["bound"] is not None else None
                    bound = "n/a" if rel is None else (
                        f"x-rank >= {rel * ilp_x:.3f}" if nodes == 1 else
                        f"traffic >= {rel:.3f} x the ilp's (link-weighted)")
                    print(f"{'':<12} stage 3: x-rank {ilp_x:.3f} -> "
                          f"{m['cross_rank_fraction']:.3f} ({1 - m['cross_rank_fraction'] / base['cross_rank_fraction']:.1%} "
                          f"below contiguous), {s3['local_moves']} local moves"
                          f"{'' if s3['local_converged'] else ' (timed out)'}, joint MIP "
                          f"{j.get('status', 'off')}; bound under the same balance floor: {bound}, "
                          f"{s3['time_s']:.1f}s")
                if name == "ilp":
                    last, ilp_x = r, m["cross_rank_fraction"]
    print("\nspeedup = contiguous step time / step time; a2a cost = stage-2 all-to-all cost "
          "(traffic/bandwidth + weighted max rank pair) relative to contiguous.")
    if a.a2a and one_node:
        from placement_a2a import measure, print_table

        res = measure(prof, one_node, a.a2a_dim, a.a2a_ffn, a.a2a_tokens, a.a2a_steps, a.seed)
        print_table(res, a.ranks, a.a2a_tokens, a.a2a_dim)
    if a.out and last is not None:
        last.to_json(a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
