"""Measured all-to-all bytes and time of kiln's expert-parallel dispatch on gloo, per placement,
with and without dedup dispatch.

R gloo ranks each run L real MoE blocks (kiln.model.moe) sharded by
kiln.parallel.expert.apply_expert_parallel, forward + backward, with their routers replaced by a
replay of token routes sampled from a RoutingProfile (every rank its own tokens, the same tokens
for every placement). With co-selection counts in the profile a token's first choice follows the
layer's load and each further one the co-selection row of the choices already made (for top-2
that reproduces the profile's pair counts exactly); without them, k distinct experts by load.
kiln.parallel.expert.A2A_STATS counts the bytes every rank sends to other ranks (token rows,
their returns, the backward, counts and dedup's metadata: everything all_to_all_single moved) and
times the all-to-alls. Time per step is the slowest rank's; median and p99 over the steps.
A rank whose experts got more tokens computes longer, so the others wait inside the combine
all-to-all: imbalance shows up as all-to-all time. Tokens return to their home rank after every
MoE layer, so without dedup the bytes do not depend on the placement; with dedup a token whose
choices share a rank is sent once, which co-selection placement (place(..., coselect=True)) uses.

    .venv/bin/python bench/placement_a2a.py                       # skewed synthetic, 4 ranks
    .venv/bin/python bench/placement_a2a.py runs/moe_tiny/profiles/routing_latest.npz --ranks 2
Used by bench/placement.py --a2a too.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.dist: the gloo harness the tests use


def _routes(load_row, co_row, n: int, k: int, gen) -> "torch.Tensor":
    """[n, k] distinct experts per token: the first by load, the next by the co-selection counts
    of the choices made (None: by load, Gumbel top-k)."""
    import torch

    load_row = torch.as_tensor(load_row, dtype=torch.float64)
    if co_row is None or k == 1:
        logp = torch.log(load_row.clamp(min=1e-9))
        g = -torch.log(-torch.log(torch.rand(n, logp.numel(), generator=gen, dtype=torch.float64)))
        return (logp + g).topk(k, dim=-1).indices
    co = torch.as_tensor(co_row, dtype=torch.float64)
    out = torch.empty(n, k, dtype=torch.long)
    out[:, 0] = torch.multinomial(load_row.clamp(min=1e-12).expand(n, -1), 1, generator=gen)[:, 0]
    weight = torch.zeros(n, co.shape[0], dtype=torch.float64)
    for j in range(1, k):
        weight += co[out[:, j - 1]]
        w = weight.scatter(1, out[:, :j], 0.0) + 1e-12            # taken experts excluded
        w = w.scatter(1, out[:, :j], 0.0)
        out[:, j] = torch.multinomial(w, 1, generator=gen)[:, 0]
    return out


def _worker(rank, world, load, coselect, top_k, placements, dedups, dim, ffn, tokens, steps, seed):
    import torch
    import torch.distributed as dist
    from torch import nn

    from kiln.parallel.expert import A2A_STATS, apply_expert_parallel
    from kiln.model.moe import MoE, MoEConfig

    class Replay(nn.Module):
        """Stands in for a router: returns this rank's pre-sampled routes."""

        def __init__(self, idx):
            super().__init__()
            self.idx = idx
            self.weight = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            w = torch.full(self.idx.shape, 1.0 / self.idx.shape[1], dtype=x.dtype) + 0 * self.weight
            zero = torch.zeros((), dtype=x.dtype)
            return self.idx, w, {"loss": zero, "load_balance": zero, "z": zero,
                                 "dropped": torch.zeros((), dtype=torch.long)}

    L, E = load.shape
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    routes = [_routes(load[l], None if coselect is None else coselect[l], tokens, top_k, gen)
              for l in range(L)]
    x = torch.randn(tokens, dim, generator=gen)
    nets = {}
    for name, placement in placements.items():
        torch.manual_seed(seed)
        blocks = nn.ModuleList(MoE(dim, ffn, MoEConfig(num_experts=E, top_k=top_k)) for _ in range(L))
        for b, idx in zip(blocks, routes):
            b.router = Replay(idx)
        net = nn.Module()
        net.layers = blocks  # the bank joins `net`, not the list of blocks
        apply_expert_parallel(net, dist.group.WORLD, np.asarray(placement))
        for dedup in dedups:
            nets[name, dedup] = net
    out = {key: {"a2a_s": [], "step_s": [], "bytes": 0} for key in nets}
    for i in range(steps + 2):  # the first two rounds are a warm-up
        for (name, dedup), net in nets.items():  # interleaved: load drift hits every case alike
            net.kiln_ep.dedup = dedup
            h = x.clone().requires_grad_()
            dist.barrier()
            A2A_STATS.reset()
            t0 = time.perf_counter()
            y = h
            for b in net.layers:
                y = y + b(y)
            y.square().mean().backward()
            dt = time.perf_counter() - t0
            snap = A2A_STATS.snapshot()
            if i >= 2:
                out[name, dedup]["a2a_s"].append(snap["seconds"])
                out[name, dedup]["step_s"].append(dt)
                out[name, dedup]["bytes"] = snap["bytes"]
    return out


def measure(profile, placements: dict, dim: int = 256, ffn: int = 512, tokens: int = 2048,
            steps: int = 50, seed: int = 0, dedups=(False, True), timeout: float = 900.0) -> dict:
    """{(name, dedup): {"mib_per_rank", "a2a_med_ms", "a2a_p99_ms", "step_med_ms", "step_p99_ms"}}:
    per step, bytes averaged over ranks and times of the slowest rank; median / p99 over steps."""
    from tests.dist import run_ranks

    ranks = int(max(np.max(p) for p in placements.values())) + 1
    plain = {k: np.asarray(v).tolist() for k, v in placements.items()}
    res = run_ranks(_worker, ranks, np.asarray(profile.load), profile.coselect, profile.top_k, plain,
                    tuple(dedups), dim, ffn, tokens, steps, seed, timeout=timeout,
                    threads=max(1, (os.cpu_count() or 1) // ranks))
    out = {}
    for key in res[0]:
        a2a = np.max([r[key]["a2a_s"] for r in res], 0)          # [steps]: slowest rank
        step = np.max([r[key]["step_s"] for r in res], 0)
        out[key] = {"mib_per_rank": float(np.mean([r[key]["bytes"] for r in res])) / 2 ** 20,
                    "a2a_med_ms": 1e3 * float(np.median(a2a)), "a2a_p99_ms": 1e3 * float(np.percentile(a2a, 99)),
                    "step_med_ms": 1e3 * float(np.median(step)), "step_p99_ms": 1e3 * float(np.percentile(step, 99))}
    return out


def print_table(results: dict, ranks: int, tokens: int, dim: int, balance: dict | None = None) -> None:
    """One row per (placement, dedup); bytes against the first placement with the same dedup."""
    print(f"\n== measured all-to-all on gloo: {ranks} ranks x {tokens} tokens, hidden {dim}, "
          f"forward + backward; bytes sent per rank and step, times of the slowest rank")
    print(f"{'strategy':<14} {'dedup':>5} {'bal min':>7} {'MiB/rank':>9} {'vs first':>8} "
          f"{'a2a med ms':>10} {'a2a p99 ms':>10} {'step med':>8} {'step p99':>8}")
    base = {}
    for (name, dedup), r in results.items():
        b = base.setdefault(dedup, r)
        bal = f"{balance[name]:.3f}" if balance and name in balance else "-"
        print(f"{name:<14} {'on' if dedup else 'off':>5} {bal:>7} {r['mib_per_rank']:9.2f} "
              f"{r['mib_per_rank'] / max(b['mib_per_rank'], 1e-12) - 1:+8.1%} {r['a2a_med_ms']:10.1f} "
              f"{r['a2a_p99_ms']:10.1f} {r['step_med_ms']:8.1f} {r['step_p99_ms']:8.1f}")


STRATEGIES = [("contiguous", "contiguous", {}), ("greedy_lpt", "greedy_lpt", {}),
              ("ilp", "ilp", {}), ("ilp+coselect", "ilp", {"coselect": True})]


def main(argv=None):
    from kiln.parallel.placement import RoutingProfile, Topology, place, synthetic_profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile", nargs="?", help="RoutingProfile .npz (default: the skewed synthetic one)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60, help="measured steps per case (after 2 warm-up)")
    ap.add_argument("--min-balance", type=float, default=0.95)
    ap.add_argument("--time-limit", type=float, default=20.0, help="ILP budget in seconds")
    # the skewed synthetic profile: Zipf popularity, experts in groups of 8 often chosen together
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=0.5)
    ap.add_argument("--together", type=float, default=0.8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.profile:
        prof, src = RoutingProfile.load(a.profile), a.profile
    else:
        prof = synthetic_profile(a.layers, a.experts, 2, 20000, zipf_a=a.zipf, correlation=0.2,
                                 seed=a.seed, together=a.together, group=a.group)
        src = (f"synthetic: {a.layers} x {a.experts} experts, top-2, zipf {a.zipf}, groups of "
               f"{a.group} chosen together with p {a.together}, seed {a.seed}")
    print(f"profile: {src}")
    placements, balance = {}, {}
    for name, strategy, kw in STRATEGIES:
        if kw.get("coselect") and prof.coselect is None:
            continue
        r = place(prof, strategy, Topology(a.ranks), time_limit=a.time_limit,
                  min_balance=a.min_balance, **kw)
        placements[name], balance[name] = r.placement, r.metrics["balancedness_min"]
        kept = r.metrics.get("coselect_kept_fraction")
        print(f"{name:<14} modelled: balancedness min {balance[name]:.3f}, co-selection pairs on one "
              f"rank {'-' if kept is None else f'{kept:.3f}'}")
    t0 = time.perf_counter()
    print_table(measure(prof, placements, a.dim, a.ffn, a.tokens, a.steps, a.seed),
                a.ranks, a.tokens, a.dim, balance)
    print(f"(measured in {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
