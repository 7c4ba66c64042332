"""Measured all-to-all time of kiln's expert-parallel dispatch on gloo, one figure per placement.

R gloo ranks each run L real MoE blocks (kiln.model.moe) sharded by
kiln.parallel.expert.apply_expert_parallel, forward + backward, with their routers replaced by a
replay of token routes sampled from a RoutingProfile (each layer's expert popularity; every rank
its own tokens, the same tokens for every placement). kiln.parallel.expert.A2A_STATS times the
all-to-alls: dispatch, combine and their backward. A rank whose experts got more tokens computes
longer, so the others wait inside the combine all-to-all: imbalance shows up as all-to-all time
(the tail MoETuner targets). Tokens return to their home rank after every MoE layer (attention
needs the whole sequence), so the bytes sent do not depend on the placement, only their spread.

Used by bench/placement.py --a2a; also runnable alone:
    .venv/bin/python bench/placement_a2a.py runs/moe_tiny/profiles/routing_latest.npz --ranks 2
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


def _routes(load_row: np.ndarray, n: int, k: int, gen) -> "torch.Tensor":
    """k distinct experts per token, drawn with probability proportional to load (Gumbel top-k)."""
    import torch

    logp = torch.log(torch.as_tensor(load_row, dtype=torch.float64).clamp(min=1e-9))
    g = -torch.log(-torch.log(torch.rand(n, logp.numel(), generator=gen, dtype=torch.float64)))
    return (logp + g).topk(k, dim=-1).indices


def _worker(rank, world, load, top_k, placements, dim, ffn, tokens, repeats, seed):
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
    routes = [_routes(load[l], tokens, top_k, gen) for l in range(L)]
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
        nets[name] = net
    times = {name: ([], [], 0) for name in placements}
    for i in range(repeats + 1):  # the first round is a warm-up
        for name, net in nets.items():  # interleaved, so load drift hits every placement alike
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
            if i:
                times[name][0].append(snap["seconds"])
                times[name][1].append(dt)
                times[name] = (times[name][0], times[name][1], snap["bytes"])
    return {name: {"a2a_s": float(np.median(a)), "step_s": float(np.median(st)), "bytes": nb}
            for name, (a, st, nb) in times.items()}


def measure(load: np.ndarray, top_k: int, placements: dict, dim: int = 256, ffn: int = 512,
            tokens: int = 2048, repeats: int = 5, seed: int = 0, timeout: float = 900.0) -> dict:
    """{name: {"a2a_max_ms", "a2a_mean_ms", "step_ms", "mib_per_rank"}} over R = placement ranks."""
    from tests.dist import run_ranks

    ranks = int(max(np.max(p) for p in placements.values())) + 1
    plain = {k: np.asarray(v).tolist() for k, v in placements.items()}
    res = run_ranks(_worker, ranks, np.asarray(load), top_k, plain, dim, ffn, tokens, repeats, seed,
                    timeout=timeout, threads=max(1, (os.cpu_count() or 1) // ranks))
    out = {}
    for name in placements:
        a2a = [r[name]["a2a_s"] for r in res]
        out[name] = {"a2a_max_ms": 1e3 * max(a2a), "a2a_mean_ms": 1e3 * float(np.mean(a2a)),
                     "step_ms": 1e3 * max(r[name]["step_s"] for r in res),
                     "mib_per_rank": float(np.mean([r[name]["bytes"] for r in res])) / 2 ** 20}
    return out


def print_table(results: dict, ranks: int, tokens: int, dim: int) -> None:
    """One row per placement, ratios against the first (contiguous)."""
    print(f"\n== measured all-to-all on gloo: {ranks} ranks x {tokens} tokens, hidden {dim}, "
          f"forward + backward (median of repeats; max/mean over ranks)")
    print(f"{'strategy':<12} {'a2a max ms':>10} {'a2a mean ms':>11} {'vs first':>8} {'step ms':>8} "
          f"{'MiB/rank':>9}")
    base = None
    for name, r in results.items():
        base = base or r
        print(f"{name:<12} {r['a2a_max_ms']:10.1f} {r['a2a_mean_ms']:11.1f} "
              f"{base['a2a_max_ms'] / max(r['a2a_max_ms'], 1e-9):7.2f}x {r['step_ms']:8.1f} "
              f"{r['mib_per_rank']:9.2f}")


def main(argv=None):
    from kiln.parallel.placement import RoutingProfile, Topology, place

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile", help="RoutingProfile .npz")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    prof = RoutingProfile.load(a.profile)
    placements = {s: place(prof, s, Topology(a.ranks), time_limit=30).placement
                  for s in ("contiguous", "round_robin", "greedy_lpt", "ilp")}
    print_table(measure(prof.load, prof.top_k, placements, a.dim, a.ffn, a.tokens, a.repeats),
                a.ranks, a.tokens, a.dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
