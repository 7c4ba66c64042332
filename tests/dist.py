"""A small multi-process harness for distributed tests: real processes, real gloo.

    from tests.dist import run_ranks
    results = run_ranks(fn, 4, arg1, arg2, timeout=120)   # [fn's return value on rank 0, ...]

fn(rank, world, *args) runs in a fresh spawned process after torch.distributed is initialised
with gloo on a free localhost port; it must be a module-level function (spawn pickles it by
name). Its return value travels back through torch.save, so tensors, dicts and lists are fine.
An exception on any rank is re-raised here as RankFailure with that rank's traceback; a rank
that dies or a run that exceeds `timeout` seconds kills the remaining ranks and raises too.
Spawning costs seconds on a small machine, so run several cases inside one fn.
"""
import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """A rank raised, died or timed out."""


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, threads, fn, args, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        value = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything, including KeyboardInterrupt-like failures
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, threads: int = 1):
    """Run fn(rank, world_size, *args) on world_size gloo ranks; return the per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, threads, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in out]
                if dead:
                    raise RankFailure(f"rank(s) {dead} died with exit codes "
                                      f"{[procs[r].exitcode for r in dead]} before reporting")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise RankFailure(f"timed out after {timeout:.0f}s waiting for ranks "
                                      f"{missing} (a hang in a collective or p2p op?)")
                continue
            if not ok:
                raise RankFailure(f"rank {rank} of {world_size} failed:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.kill()  # only processes started here
                p.join()
    return [out[r] for r in range(world_size)]
