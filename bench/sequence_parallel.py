"""TokenRing vs Ring Attention vs DeepSpeed-Ulysses: fwd+bwd time, bytes per direction, balance.

    .venv/bin/python bench/sequence_parallel.py [--ranks 2 4] [--seq 1024 2048] [--iters 3]

Runs real gloo ranks on CPU (one torch thread each), fp32, causal, the three algorithms on the
same global q/k/v (zigzag shards for the rings, contiguous ones for Ulysses, which all-to-alls
heads and so needs no causal balancing), in turn each iteration so machine noise hits all alike.
Ulysses is refused (row says so) where heads or kv heads do not divide over the ranks. Time is
the median over iterations of the slowest rank's fwd+bwd. Bytes are what the slowest-sending
rank sent per direction in one fwd+bwd ("forward" = towards higher ranks). Imbalance is the
schedule's per-rank causal work, max/mean (zigzag), next to what contiguous shards would give.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.dist (the spawner)

from kiln.parallel.comm import COMM_STATS  # noqa: E402
from kiln.parallel.ring import ring_attention  # noqa: E402
from kiln.parallel.ring_common import contiguous_work, schedule_work  # noqa: E402
from kiln.parallel.sequence import contiguous_shard  # noqa: E402
from kiln.parallel.tokenring import tokenring_attention  # noqa: E402
from kiln.parallel.ulysses import UlyssesAttention, ulysses_refusal  # noqa: E402
from kiln.parallel.zigzag import zigzag_shard  # noqa: E402
from tests.dist import run_ranks  # noqa: E402

IMPLS = ("tokenring", "ring", "ulysses")


def _step(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn(q, k, v, causal=True).backward(dout)


def _worker(rank, world, shapes, iters):
    rows = []
    fns = {"tokenring": tokenring_attention, "ring": ring_attention, "ulysses": UlyssesAttention(None)}
    for seq, hq, hkv, d in shapes:
        g = torch.Generator().manual_seed(seq)
        full = [torch.randn(1, seq, h, d, generator=g) for h in (hq, hkv, hkv, hq)]
        shards = {"zigzag": [zigzag_shard(t, world, rank=rank) for t in full],
                  "contiguous": [contiguous_shard(t, None) for t in full]}
        impls = [n for n in IMPLS if n != "ulysses" or ulysses_refusal(hq, hkv, world) is None]
        times, cpu, cpu_imb = ({name: [] for name in impls} for _ in range(3))
        sent = {}
        for it in range(iters + 1):  # iteration 0 warms up
            for name in impls:
                fn = fns[name]
                q, k, v, dout = shards["contiguous" if name == "ulysses" else "zigzag"]
                COMM_STATS.reset()
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                _step(fn, q, k, v, dout)
                mine = torch.tensor([time.perf_counter() - t0, time.process_time() - c0])
                every = [torch.empty(2, dtype=mine.dtype) for _ in range(world)]
                dist.all_gather(every, mine)
                wall, cpus = max(t[0].item() for t in every), [t[1].item() for t in every]
                if it:  # the slowest rank's wall time; CPU: slowest rank, and max/mean over ranks
                    times[name].append(wall)
                    cpu[name].append(max(cpus))
                    cpu_imb[name].append(max(cpus) / statistics.mean(cpus))
                snap = COMM_STATS.snapshot()
                sent[name] = [snap["fwd"][x] + snap["bwd"][x] for x in ("forward", "backward")]
        for name in impls:
            b = torch.tensor(sent[name])
            dist.all_reduce(b, op=dist.ReduceOp.MAX)
            rows.append(dict(impl=name, ranks=world, seq=seq, hq=hq, hkv=hkv, d=d,
                             ms=1e3 * statistics.median(times[name]), min_ms=1e3 * min(times[name]),
                             cpu_ms=1e3 * statistics.median(cpu[name]),
                             cpu_imb=statistics.median(cpu_imb[name]), fwd_dir=b[0].item(),
                             bwd_dir=b[1].item()))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--gqa-kv-heads", type=int, default=2, help="extra GQA row at the middle S")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    shapes = [(s, args.heads, args.heads, args.head_dim) for s in args.seq]
    if args.gqa_kv_heads:
        shapes.append((args.seq[len(args.seq) // 2], args.heads, args.gqa_kv_heads, args.head_dim))
    print("| impl | ranks | S | hq/hkv | ms median (min) | CPU ms | MB -> next | MB -> prev | MB sent "
          "| /Ring median/min/CPU | imbalance: schedule (contiguous); measured CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    wins = []
    for world in args.ranks:
        rows = run_ranks(_worker, world, shapes, args.iters, timeout=3600)[0]
        ring = {(r["seq"], r["hkv"]): r for r in rows if r["impl"] == "ring"}
        for seq, hq, hkv, _ in shapes:
            why = ulysses_refusal(hq, hkv, world)
            mine = [r for r in rows if (r["seq"], r["hkv"]) == (seq, hkv)]
            for r in mine:
                s_local = r["seq"] // world
                if r["impl"] == "ulysses":  # every rank: the whole causal sequence for 1/N of the heads
                    imb = f"1.00 (1.00); {r['cpu_imb']:.2f}"
                else:
                    zz = schedule_work(world, s_local, r["impl"])
                    cont = contiguous_work(world, s_local)
                    imb = (f"{max(zz) / statistics.mean(zz):.2f} ({max(cont) / statistics.mean(cont):.2f})"
                           f"; {r['cpu_imb']:.2f}")
                base = ring[seq, hkv]
                ratio = "/".join(f"{r[x] / base[x]:.2f}" for x in ("ms", "min_ms", "cpu_ms"))
                print(f"| {r['impl']} | {world} | {seq} | {hq}/{hkv} "
                      f"| {r['ms']:.0f} ({r['min_ms']:.0f}) | {r['cpu_ms']:.0f} "
                      f"| {r['fwd_dir'] / 2**20:.2f} | {r['bwd_dir'] / 2**20:.2f} "
                      f"| {(r['fwd_dir'] + r['bwd_dir']) / 2**20:.2f} | {ratio} | {imb} |", flush=True)
            if why:
                print(f"| ulysses | {world} | {seq} | {hq}/{hkv} | refused: kv heads {hkv} do not divide "
                      f"over {world} ranks | | | | | | |", flush=True)
            fast = min(mine, key=lambda r: r["ms"])
            light = min(mine, key=lambda r: r["fwd_dir"] + r["bwd_dir"])
            wins.append(f"{world} ranks, S={seq}, {hq}/{hkv} heads: fastest {fast['impl']}, "
                        f"fewest bytes {light['impl']}")
    print()
    for line in wins:
        print("-", line)


if __name__ == "__main__":
    main()
