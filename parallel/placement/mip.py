"""HiGHS MIP wrapper and the linear assignment (scipy), shared by the placement ILP stages."""
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


def assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect assignment of a square matrix (scipy's linear_sum_assignment, exact):
    returns col[r] for each row r. Entries may be +inf for forbidden pairs."""
    c = np.asarray(cost, dtype=np.float64)
    from scipy.optimize import linear_sum_assignment  # 0.9 s of import: only where an assignment runs

    try:
        rows, col = linear_sum_assignment(c)
    except ValueError:  # scipy: "cost matrix is infeasible"
        raise PlacementError("assignment has no feasible permutation; this is a kiln bug") from None
    out = np.empty(c.shape[0], dtype=np.int64)
    out[rows] = col
    return out


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
