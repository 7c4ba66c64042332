"""MoETuner stage 2: place each layer's clusters on ranks, chained over layers.

State: sigma[l][r] = the stage-1 slot whose layer-l cluster sits on rank r. Cost of a layer pair =
sum of rank-pair traffic/bandwidth + w * the largest rank-pair cost (``metrics.pair_cost``).
Every move keeps the memory balance exact (each rank keeps L*E/R experts):
  * segment assignment over layers [a, b): rank r takes rank q's holdings in [a, b) when both hold
    equally many experts there. Given the layers outside the segment, only the two boundary pairs
    change (the inner pairs are permuted consistently), so the best choice is an R x R assignment
    solved exactly: a linear assignment (scipy) when w = 0, a small HiGHS MIP (R*R binaries + 2 epigraph variables)
    otherwise. On several nodes this holds for node-preserving assignments; an unrestricted one is
    also tried and kept only if the whole objective drops.
  * chain: the segments [b, L) for b = 1..L-1 in order are the chain of exact assignments, each
    layer's map chosen given the previous layer's; this builds the starting point.
  * swaps of two ranks' holdings over a segment (also across nodes), first improvement.
Passes repeat until none improves (local search) or the time budget ends. The result is a local
optimum: moves that need different permutations on several layers at once (e.g. a Latin square
of cluster sizes) are out of reach, so tiny instances ((R!)^L <= EXHAUSTIVE_LIMIT) are enumerated.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np

from kiln.parallel.placement.mip import Rows, assignment, gap
from kiln.parallel.placement.metrics import one_hot, pair_cost


def assign_step(prev_t, next_t, link: np.ndarray, weight: float, allowed: np.ndarray,
                time_limit: float = 10.0) -> np.ndarray:
    """Exact best permutation pi (rank r takes what rank pi[r] held) for one layer.

    prev_t[p, q]: traffic from rank p (layer l-1) to what rank q holds now (layer l), or None;
    next_t[q, n]: traffic from what q holds (layer l) to rank n (layer l+1), or None.
    Cost = sum of pair costs of the two layer pairs (``pair_cost`` with ``weight``).
    ``allowed[r, q]``: may rank r take q's holding.
    """
    R = link.shape[0]
    lin = np.zeros((R, R))                                      # lin[r, q]
    if prev_t is not None:
        lin += (link.T @ prev_t)                                # sum_p link[p, r] * prev_t[p, q]
    if next_t is not None:
        lin += link @ next_t.T                                  # sum_n link[r, n] * next_t[q, n]
    if weight == 0 or (prev_t is None and next_t is None):
        return assignment(np.where(allowed, lin, np.inf))
    # Costs are seconds (~1e-6); scale them to O(1) so HiGHS's tolerances mean something.
    scale = max(np.abs(lin).max(), 1e-300)
    A = np.arange(R * R).reshape(R, R)                          # a[r, q]
    z = [R * R, R * R + 1]                                      # epigraphs of the two max terms
    rows = Rows()
    for r in range(R):
        rows.add(A[r], np.ones(R), 1, 1)
        rows.add(A[:, r], np.ones(R), 1, 1)
    for p in range(R):
        for r in range(R):
            if prev_t is not None and link[p, r] > 0:           # cost of p -> r in pair (l-1, l)
                rows.add(np.r_[A[r], z[0]], np.r_[prev_t[p] * link[p, r] / scale, -1.0], -np.inf, 0.0)
            if next_t is not None and link[p, r] > 0:           # cost of p -> r in pair (l, l+1)
                rows.add(np.r_[A[p], z[1]], np.r_[next_t[:, r] * link[p, r] / scale, -1.0], -np.inf, 0.0)
    cost = np.r_[lin.ravel() / scale, weight, weight]
    upper = np.r_[allowed.ravel().astype(float), np.inf, np.inf]
    x, _ = rows.solve(cost, np.zeros(R * R + 2), upper, np.r_[np.ones(R * R, bool), False, False],
                      time_limit=time_limit, rel_gap=0.0, abs_gap=0.0)
    if x is None:
        return assignment(np.where(allowed, lin, np.inf))
    return x[:R * R].reshape(R, R).argmax(1)


class _Chain:
    """Stage-2 state: sigma[l, r] = slot whose layer-l cluster sits on rank r."""

    def __init__(self, slot_t, sizes, link, weight, node):
        self.T, self.sizes, self.link, self.w, self.node = slot_t, sizes, link, weight, node
        self.L, self.R = sizes.shape
        self.sigma = np.tile(np.arange(self.R), (self.L, 1))

    def traffic(self, l, sigma=None):
        s = self.sigma if sigma is None else sigma
        return self.T[l][np.ix_(s[l], s[l + 1])]

    def objective(self, sigma=None) -> float:
        return sum(pair_cost(self.traffic(l, sigma), self.link, self.w) for l in range(self.L - 1))

    def segment_assign(self, a: int, b: int, node_preserving: bool, limit: float) -> np.ndarray:
        """Best re-assignment of the ranks' holdings over layers [a, b) (exact at its boundaries).

        Rank r may take rank q's holdings in [a, b) when both hold equally many experts there, so
        memory stays balanced. b = L is a tail relink, b = a + 1 a single-layer re-solve.
        """
        seg = self.sizes[np.arange(a, b)[:, None], self.sigma[a:b]].sum(0)
        allowed = seg[:, None] == seg[None, :]
        if node_preserving:
            allowed &= self.node[:, None] == self.node[None, :]
        prev_t = self.traffic(a - 1) if a > 0 else None
        next_t = self.traffic(b - 1) if b < self.L else None
        pi = assign_step(prev_t, next_t, self.link, self.w, allowed, limit)
        new = self.sigma.copy()
        new[a:b] = self.sigma[a:b, pi]
        return new

    def segment_sweep(self, deadline: float) -> int:
        """First-improvement swaps of two ranks' holdings over a layer segment [a, b).

        Memory-neutral when both ranks hold equally many experts in the segment. b = L with a = 0
        relabels two ranks everywhere, which matters only across nodes. Returns moves made.
        """
        L, R = self.L, self.R
        pc = np.array([pair_cost(self.traffic(l), self.link, self.w) for l in range(L - 1)])
        moves = 0
        for r1 in range(R):
            for r2 in range(r1 + 1, R):
                if time.perf_counter() > deadline:
                    return moves
                same = self.node[r1] == self.node[r2]
                held = self.sizes[np.arange(L)[:, None], self.sigma[:, [r1, r2]]]
                D = np.r_[0, np.cumsum(held[:, 0] - held[:, 1])]
                for a in range(L):
                    for b in range(a + 1, L + 1):
                        if D[a] != D[b] or (same and a == 0 and b == L):
                            continue
                        touched = [p for p in (a - 1, b - 1) if 0 <= p < L - 1] if same else \
                            list(range(max(a - 1, 0), min(b, L - 1)))
                        if not touched:
                            continue
                        new = self.sigma.copy()
                        new[a:b, [r1, r2]] = self.sigma[a:b, [r2, r1]]
                        cand = [pair_cost(self.traffic(p, new), self.link, self.w) for p in touched]
                        if sum(cand) < pc[touched].sum() * (1 - 1e-9) - 1e-15:
                            self.sigma, moves = new, moves + 1
                            pc[touched] = cand
                            held = self.sizes[np.arange(L)[:, None], self.sigma[:, [r1, r2]]]
                            D = np.r_[0, np.cumsum(held[:, 0] - held[:, 1])]
        return moves


BOUND_OF = {   # what info["bound_s"] bounds, written next to it
    "exhaustive": "exact: the least stage-2 cost over every memory-balanced placement of these "
                  "stage-1 clusters (enumerated)",
    "relaxed": "a lower bound on the stage-2 cost of any placement of these stage-1 clusters, "
               "memory-balanced or not (a relaxation: pairs solved alone, cheapest link); not a "
               "bound over placements with other clusters",
}
EXHAUSTIVE_LIMIT = 50000   # (R!)^L below this: stage 2 enumerates every placement of the clusters


def exhaustive_chain(slot_t, sizes: np.ndarray, link: np.ndarray, weight: float) -> np.ndarray:
    """Exact stage 2 for tiny instances: every per-layer permutation, memory-balanced ones kept."""
    L, R = sizes.shape
    perms = np.array(list(itertools.permutations(range(R))), dtype=np.int64)
    P = len(perms)
    held = sizes[np.arange(L)[:, None, None], perms[None, :, :]]        # [L, P, R]
    table = np.array([[[pair_cost(t[np.ix_(p, q)], link, weight) for q in perms] for p in perms]
                      for t in slot_t]).reshape(L - 1, P, P)
    idx = np.array(list(itertools.product(range(P), repeat=L)), dtype=np.int64)   # [N, L]
    mem = held[np.arange(L)[None, :], idx].sum(1)                       # [N, R]
    cost = sum(table[l][idx[:, l], idx[:, l + 1]] for l in range(L - 1)) if L > 1 else np.zeros(len(idx))
    cost = np.where((mem == L * sizes.sum(1)[0] // R).all(1), cost, np.inf)   # E = sizes row sum
    return perms[idx[int(np.argmin(cost))]]


def stage2_chain(slots: np.ndarray, transitions: np.ndarray, R: int, link: np.ndarray,
                 weight: float, node: np.ndarray, time_limit: float, exhaustive: bool = True):
    """Place stage-1 clusters on ranks (memory balance kept exact); returns (sigma [L, R], info).

    ``exhaustive``: enumerate every placement when (R!)^L <= EXHAUSTIVE_LIMIT (exact); else, and
    always when False, the chain of exact assignments plus local search.
    """
    t0 = time.perf_counter()
    L = slots.shape[0]
    sizes = np.stack([np.bincount(slots[l], minlength=R) for l in range(L)])
    slot_t = [one_hot(slots[l], R).T @ transitions[l] @ one_hot(slots[l + 1], R) for l in range(L - 1)]
    ch = _Chain(slot_t, sizes, link, weight, node)
    multi_node = len(np.unique(node)) > 1
    left = lambda: time_limit - (time.perf_counter() - t0)  # noqa: E731
    if exhaustive and math.factorial(R) ** L <= EXHAUSTIVE_LIMIT:
        ch.sigma = exhaustive_chain(slot_t, sizes, link, weight)
        best = ch.objective()
        return ch.sigma, {"objective_s": best, "forward_chain_s": best, "bound_s": best,
                          "gap_vs_bound": 0.0, "bound_of": BOUND_OF["exhaustive"],
                          "exhaustive": True, "passes": 0, "moves": 0,
                          "time_s": time.perf_counter() - t0}
    for b in range(1, L):                       # forward chain of exact assignments
        ch.sigma = ch.segment_assign(b, L, False, max(left(), 0.05))
    start_obj = best = ch.objective()
    passes, moves = 0, 0
    segments = sorted(((a, b) for a in range(L) for b in range(a + 1, L + 1)
                       if not (a == 0 and b == L)), key=lambda ab: (ab[1] - ab[0], ab[0]))
    while left() > 0:
        passes += 1
        improved = False
        for a, b in segments:
            if left() <= 0:
                break
            # Node-preserving moves keep every inner pair's cost, so they are exact; on several
            # nodes the unrestricted move is tried too and kept only if the whole objective drops.
            for new in [ch.segment_assign(a, b, True, left())] + \
                    ([ch.segment_assign(a, b, False, left())] if multi_node else []):
                obj = ch.objective(new)
                if obj < best * (1 - 1e-9) - 1e-15:
                    ch.sigma, best, improved, moves = new, obj, True, moves + 1
        if left() > 0:
            n = ch.segment_sweep(time.perf_counter() + left())
            if n:
                best, improved, moves = ch.objective(), True, moves + n
        if not improved:
            break
    # The bound of a relaxation (BOUND_OF): each pair alone, best cluster matching, every
    # cross-rank pair at the cheapest link; the max pair costs at least the mean off-diagonal pair.
    # Dropping memory balance, topology and the coupling of pairs only lowers it, so it stays a
    # valid lower bound for the memory-balanced problem (and gap_vs_bound over-states the gap).
    off = link[~np.eye(R, dtype=bool)]
    cheapest = off.min() if off.size else 0.0
    bound = 0.0
    for t in slot_t:
        keep = t[np.arange(R), assignment(-t)].sum()
        lb = (t.sum() - keep) * cheapest
        bound += lb + weight * lb / max(R * (R - 1), 1)
    info = {"objective_s": best, "forward_chain_s": start_obj, "bound_s": bound,
            "gap_vs_bound": gap(best, bound), "bound_of": BOUND_OF["relaxed"], "passes": passes,
            "moves": moves,
            "time_s": time.perf_counter() - t0}
    return ch.sigma, info


def sigma_to_placement(slots: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """placement[l, e] = rank holding slot slots[l, e] in layer l."""
    L, R = sigma.shape
    rank_of_slot = np.empty_like(sigma)
    rank_of_slot[np.arange(L)[:, None], sigma] = np.arange(R)[None, :]
    return rank_of_slot[np.arange(L)[:, None], slots]
