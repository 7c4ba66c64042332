"""HiGHS MIP wrapper and a Hungarian assignment solver, shared by the placement ILP stages."""
from __future__ import annotations

import os
import sys
import time

import highspy
import numpy as np

from kiln.parallel.placement.io import PlacementError


def solve_mip(cost, lower, upper, integer, rows, cols, vals, row_lo, row_hi,
              time_limit: float = 60.0, rel_gap: float = 1e-4, warm=None, seed: int = 0,
              abs_gap: float = 1e-6):
    """Minimise cost @ x s.t. row_lo <= A x <= row_hi (A in COO form) with HiGHS.

    Returns (x or None, info) where info has status, objective, bound, gap, time_s.
    """
    n, m = len(cost), len(row_lo)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, m
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = list(map(float, cost)), list(map(float, lower)), \
        list(map(float, upper))
    lp.row_lower_, lp.row_upper_ = list(map(float, row_lo)), list(map(float, row_hi))
    order = np.lexsort((cols, rows))
    rows, cols, vals = np.asarray(rows)[order], np.asarray(cols)[order], np.asarray(vals)[order]
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, m
    lp.a_matrix_.start_ = np.searchsorted(rows, np.arange(m + 1)).astype(np.int32).tolist()
    lp.a_matrix_.index_ = cols.astype(np.int32).tolist()
    lp.a_matrix_.value_ = vals.astype(float).tolist()
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in integer]
    h = _quiet_highs()
    h.setOptionValue("time_limit", float(max(time_limit, 0.01)))
    h.setOptionValue("mip_rel_gap", float(rel_gap))
    h.setOptionValue("mip_abs_gap", float(abs_gap))
    h.setOptionValue("random_seed", int(seed))
    h.setOptionValue("threads", 1)
    h.passModel(lp)
    if warm is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(map(float, warm))
        sol.value_valid = True
        h.setSolution(sol)
    t0 = time.perf_counter()
    h.run()
    dt = time.perf_counter() - t0
    status = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    x = None
    if info.primal_solution_status == 2:   # kSolutionStatusFeasible
        x = np.asarray(h.getSolution().col_value)
    obj = float(info.objective_function_value) if x is not None else float("inf")
    bound = float(info.mip_dual_bound)
    return x, {"status": status, "objective": obj, "bound": bound, "gap": gap(obj, bound),
               "time_s": dt}


def _quiet_highs():
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    return h


def _swallow_banner() -> None:
    """HiGHS >= 1.16 prints a two-line banner on stdout when a process builds its first instance,
    before output_flag can be set. Build that first one here, at import (in the main thread, before
    any solve thread exists), with fd 1 pointed at /dev/null, so kiln's output never carries it."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


_swallow_banner()


def gap(obj: float, bound: float) -> float:
    """Relative MIP gap as HiGHS defines it: (primal - dual) / |primal| (0 when both are 0)."""
    if not np.isfinite(obj):
        return float("inf")
    if abs(obj) < 1e-12:
        return 0.0 if bound > -1e-9 else float("inf")
    return max(0.0, (obj - bound) / abs(obj))


def hungarian(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect assignment of a square matrix: returns col[r] for each row r.

    Shortest augmenting paths with potentials (Kuhn-Munkres / Jonker-Volgenant style), O(n^3).
    Entries may be +inf for forbidden pairs (a feasible assignment must exist).
    """
    c = np.asarray(cost, dtype=np.float64)
    n = c.shape[0]
    big = (np.abs(c[np.isfinite(c)]).sum() + 1.0) * (n + 1)
    c = np.where(np.isfinite(c), c, big)
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)        # match[col] = row (1-based; 0 = free)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            cur = c[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            upd = free & (cur < minv[1:])
            minv[1:][upd] = cur[upd]
            way[1:][upd] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(cand.argmin()) + 1
            delta = cand[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[match[1:] - 1] = np.arange(n)
    if (c[np.arange(n), col] >= big).any():
        raise PlacementError("assignment has no feasible permutation; this is a kiln bug")
    return col


class Rows:
    """Accumulates sparse constraint rows lo <= sum(vals * x[cols]) <= hi for ``solve_mip``."""

    def __init__(self):
        self.rows, self.cols, self.vals, self.lo, self.hi = [], [], [], [], []

    def add(self, cols, vals, lo, hi):
        self.rows.append(np.full(np.size(cols), len(self.lo)))
        self.cols.append(np.ravel(cols))
        self.vals.append(np.ravel(np.asarray(vals, dtype=float)))
        self.lo.append(lo)
        self.hi.append(hi)

    def solve(self, cost, lower, upper, integer, **kw):
        return solve_mip(cost, lower, upper, integer, np.concatenate(self.rows),
                         np.concatenate(self.cols), np.concatenate(self.vals), self.lo, self.hi, **kw)
