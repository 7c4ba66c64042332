"""Activation checkpointing (train.activation_checkpointing): peak memory and step time per mode.

    .venv/bin/python bench/activation_checkpointing.py [--seq-long 4096] [--steps 3]

Two recipes, as they parallelize, on real gloo ranks (CPU, fp32, one torch thread per rank):
  - recipes/long_context.yaml: its model, TokenRing SP=2, shortened to --seq-long tokens (the
    recipe has 16384) and batch 1;
  - recipes/moe_tiny.yaml: its model, EP=2, its seq_len 128 and micro_batch 8.
Each mode runs in fresh processes: the model is built, parallelized and checkpointed as
Stage.build does (kiln.parallel.apply is replaced by its two calls, no DeepSpeed engine: plain
AdamW), then --steps fwd+bwd+step on random tokens. Peak memory is the peak resident set above
the set after building (ru_maxrss; on CUDA it would be torch.cuda.max_memory_allocated), the
largest over ranks; time is the median step of the slowest rank after one warm-up step.
"""
import argparse
import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.dist (the spawner)

from kiln.model import Transformer  # noqa: E402
from kiln.parallel.expert import apply_expert_parallel  # noqa: E402
from kiln.parallel.sequence import LAYOUTS, apply_sequence_parallel, shard_batch  # noqa: E402
from kiln.trainer.activation_checkpointing import MODES, apply_activation_checkpointing  # noqa: E402
from kiln.trainer.config import load_recipe  # noqa: E402
from kiln.trainer.objectives import CausalLM  # noqa: E402
from tests.dist import run_ranks  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _worker(rank, world, recipe_path, mode, seq, batch, steps):
    r = load_recipe(recipe_path)
    cfg = dataclasses.replace(r.model, vocab_size=r.data.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    sp = r.parallel.sp > 1
    if sp:
        apply_sequence_parallel(model, dist.group.WORLD, r.parallel.sp_impl)
    if r.parallel.ep > 1:
        apply_expert_parallel(model, dist.group.WORLD, None)
    apply_activation_checkpointing(model, mode)
    objective = CausalLM(model, loss_group=dist.group.WORLD if sp else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank if not sp else 0)  # SP ranks share rows; EP ranks do not
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    full = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
            "position_ids": torch.arange(seq).expand(batch, seq).contiguous()}
    mine = shard_batch(full, dist.group.WORLD, LAYOUTS[r.parallel.sp_impl]) if sp else full
    for p in model.parameters():  # grads and optimizer state exist before the baseline is read
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    base = _rss_mb()
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        objective(**mine).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak - base, "ms": 1e3 * statistics.median(times[1:])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-long", type=int, default=4096, help="long_context's tokens per row")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    cases = [("long_context", ROOT / "recipes/long_context.yaml", args.seq_long, 1),
             ("moe_tiny", ROOT / "recipes/moe_tiny.yaml", 128, 8)]
    print("| recipe | mode | peak MB above built | vs none | step ms | vs none |")
    print("|---|---|---|---|---|---|")
    for name, path, seq, batch in cases:
        base = None
        for mode in MODES:
            res = run_ranks(_worker, 2, str(path), mode, seq, batch, args.steps, timeout=1800)
            peak = max(x["peak_mb"] for x in res)
            ms = max(x["ms"] for x in res)
            base = base or (peak, ms)
            print(f"| {name} (S={seq}, B={batch}) | {mode} | {peak:.0f} | {peak / base[0]:.2f} "
                  f"| {ms:.0f} | {ms / base[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
