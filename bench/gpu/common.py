"""Shared pieces of the GPU check: the time budget, the report, timing, errors and poisoning.

Every part writes into one Report, which is saved as JSON after each case, so a run killed at
its time limit still leaves everything it measured under $OUT.
"""
import contextlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch


class Budget:
    """Seconds left of the whole check; a part or case that needs more than is left is skipped."""

    def __init__(self, total_s: float):
        self.total_s, self.t0 = float(total_s), time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s


class Report:
    """The check's results: {"meta": ..., part: {"status", "reason", "cases": [...]}}, saved to
    `path` after every change. Each case is a flat dict; "ok" is True, False or None (a figure)."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def part(self, name: str, status: str = "running", reason: str = "") -> dict:
        self.data[name] = {"status": status, "reason": reason, "cases": [], "notes": []}
        self.save()
        return self.data[name]

    def add(self, part: str, case: dict) -> None:
        self.data[part]["cases"].append(case)
        self.save()

    def note(self, part: str, line: str) -> None:
        print(f"  note: {line}", flush=True)
        self.data[part]["notes"].append(line)
        self.save()

    def finish(self, part: str, status: str, reason: str = "") -> None:
        self.data[part].update(status=status, reason=reason)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        os.replace(tmp, self.path)


def _jsonable(x):
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"not JSON: {type(x)}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere in out (an unwritten, poisoned element)
    makes it NaN, which fails every `err <= tol` test."""
    o, r = out.detach().double(), ref.detach().double()
    if o.shape != r.shape:
        raise ValueError(f"shape {tuple(o.shape)} vs reference {tuple(r.shape)}")
    den = r.norm().item()
    num = (o - r).norm().item()
    return num / den if den > 0 else num


def within(err: float, tol: float) -> bool:
    """err <= tol, False for NaN."""
    return bool(err <= tol)


_EMPTY, _EMPTY_LIKE = torch.empty, torch.empty_like


def _poison(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(-7777)
    return t


@contextlib.contextmanager
def poisoned():
    """torch.empty / empty_like return NaN-filled tensors (ints: -7777) inside: a kernel output
    that some element was never written to then shows NaN and fails its check."""
    torch.empty = lambda *a, **k: _poison(_EMPTY(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(_EMPTY_LIKE(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = _EMPTY, _EMPTY_LIKE


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn(): CUDA events around each call on a GPU (after `warmup` calls,
    which also compile), the host clock on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def peak_mib(fn, device) -> float | None:
    """Peak CUDA memory above what was allocated before fn() ran (None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def gemm_peak_flops(device) -> float:
    """Measured dense peak: bf16 8192^3 GEMMs on a GPU (median of 10 after 3), fp32 on CPU."""
    if torch.device(device).type != "cuda":
        from kiln.trainer.monitor import measure_peak
        return measure_peak(torch.device("cpu"), torch.get_num_threads(), n=256)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n ** 3 / (ms / 1e3)


def free(device) -> None:
    """Give cached blocks back between cases (each case's peak is its own)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def fmt(x, spec=".3g") -> str:
    return "-" if x is None else (format(x, spec) if isinstance(x, (int, float)) else str(x))
