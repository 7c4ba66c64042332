"""Balance-constrained traffic refinement of an expert placement (kiln's stage 3 for the ILP).

MoETuner's stage 1 clusters each layer for balance alone and stage 2 only permutes whole clusters
between ranks, so experts whose routes are correlated across layers stay in whatever clusters the
balance objective happened to form. This stage moves single experts instead. It minimises the
link-weighted transition traffic

    traffic(p) = sum over l, e, f of T[l, e, f] * link[p[l, e], p[l+1, f]]

(``link`` = seconds per pair between ranks, 0 on one rank; on one node this is a constant times
the number of cross-rank pairs) under every constraint of the ILP:
  * memory balance: every rank holds exactly L*E/R experts over the model;
  * every rank holds 1..cap experts of every layer;
  * balance: layer l's balancedness (mean/max token-choices per rank) stays >= min(min_balance,
    the input's balancedness of layer l), so a layer never drops below the threshold unless it
    was already below it, and then never below where it was.
Two steps, each kept only when it lowers the traffic (so the result is never worse than the input):
  1. local search: swaps of two experts of one layer between ranks, pairs of moves (expert of
     layer l from rank a to b, expert of layer m from b to a) that keep the memory counts, and
     an exact MIP re-placing all even (then all odd) layers at once with the others fixed;
  2. the joint MIP over all layers when it is small enough (binary y[l, e, r], continuous
     z[l, e, f, r] <= y[l, e, r], y[l+1, f, r] for "pair on one rank", and the same per node on
     several nodes), warm-started with step 1's result. Its HiGHS dual bound is a valid lower
     bound on the traffic of ANY placement meeting the constraints, reported as ``bound``.
"""
from __future__ import annotations

import time

import numpy as np

from kiln.parallel.placement.mip import Rows, gap

JOINT_MAX_COLS = 2000      # joint MIP only up to this many variables: beyond, its weak LP bound
#                            does not move within seconds and HiGHS overran its time limit


def traffic(transitions: np.ndarray, p: np.ndarray, link: np.ndarray) -> float:
    """Link-weighted transition traffic of placement ``p`` (see the module docstring)."""
    return float(sum((transitions[l] * link[p[l][:, None], p[l + 1][None, :]]).sum()
                     for l in range(p.shape[0] - 1)))


def layer_caps(load: np.ndarray, p: np.ndarray, R: int, min_balance: float) -> np.ndarray:
    """[L] most token-choices one rank may hold per layer: mean / min(min_balance, balance of p)."""
    loads = np.stack([np.bincount(p[l], weights=load[l], minlength=R) for l in range(len(p))])
    mean, mx = loads.mean(1), loads.max(1)
    cur = np.where(mx > 0, mean / np.where(mx > 0, mx, 1), 1.0)
    allowed = np.minimum(min_balance, cur)
    # A relative slack of 1e-9 so the input itself always passes despite rounding.
    return np.where(allowed > 0, mean / np.maximum(allowed, 1e-12), np.inf) * (1 + 1e-9) + 1e-9


class _State:
    """Placement with per-rank loads and counts kept up to date for O(E*R) move evaluation."""

    def __init__(self, load, transitions, p, link, R, caps, cap):
        self.load, self.T, self.p, self.link, self.R = load, transitions, p.copy(), link, R
        self.caps, self.cap = caps, cap
        L = p.shape[0]
        self.rl = np.stack([np.bincount(self.p[l], weights=load[l], minlength=R) for l in range(L)])
        self.cnt = np.stack([np.bincount(self.p[l], minlength=R) for l in range(L)])

    def gain_table(self, l: int) -> np.ndarray:
        """[E, R]: traffic of expert e of layer l if it sat on rank r (neighbours fixed)."""
        L, E = self.p.shape
        g = np.zeros((E, self.R))
        if l > 0:      # pairs (f in l-1) -> (e in l): sum_f T[f, e] * link[p[l-1, f], r]
            g += self.T[l - 1].T @ self.link[self.p[l - 1]]
        if l < L - 1:  # pairs (e in l) -> (f in l+1): sum_f T[e, f] * link[r, p[l+1, f]]
            g += self.T[l] @ self.link[:, self.p[l + 1]].T
        return g

    def load_ok(self, l, rank, delta) -> bool:
        return self.rl[l, rank] + delta <= self.caps[l]

    def move(self, l, e, b):
        a = self.p[l, e]
        self.rl[l, a] -= self.load[l, e]
        self.rl[l, b] += self.load[l, e]
        self.cnt[l, a] -= 1
        self.cnt[l, b] += 1
        self.p[l, e] = b


def _swap_pass(st: _State, tol: float) -> int:
    """Best improving swap of two experts in one layer, per layer; returns swaps made."""
    made = 0
    for l in range(st.p.shape[0]):
        g = st.gain_table(l)
        own = g[np.arange(len(g)), st.p[l]]
        # delta[e, f] of swapping e (on a) with f (on b): g[e, b] - g[e, a] + g[f, a] - g[f, b]
        ge_b = g[:, st.p[l]]                                   # [e, f] = g[e, p[f]]
        d = ge_b - own[:, None] + ge_b.T - own[None, :]
        w = st.load[l]
        for e, f in zip(*np.unravel_index(np.argsort(d, axis=None), d.shape)):
            if d[e, f] >= -tol:
                break
            a, b = st.p[l, e], st.p[l, f]
            if a == b or not (st.load_ok(l, b, w[e] - w[f]) and st.load_ok(l, a, w[f] - w[e])):
                continue
            st.move(l, e, b)
            st.move(l, f, a)
            made += 1
            break
    return made


def _pair_move_pass(st: _State, tol: float, deadline: float) -> int:
    """First improving pair of moves (l: e a->b, m: g b->a) keeping memory counts; 0 or 1."""
    L, E = st.p.shape
    R = st.R
    tables = [st.gain_table(l) for l in range(L)]
    # Single-move deltas d[l][e, b] (neighbours fixed), feasible ones only.
    single = []
    for l in range(L):
        g = tables[l]
        d = g - g[np.arange(E), st.p[l]][:, None]
        for e in range(E):
            a = st.p[l, e]
            for b in range(R):
                if b == a or st.cnt[l, a] <= 1 or st.cnt[l, b] >= st.cap \
                        or not st.load_ok(l, b, st.load[l, e]):
                    d[e, b] = np.inf
        single.append(d)
    for l in range(L):
        for e in np.argsort(single[l].min(1)):
            a = st.p[l, e]
            for b in np.argsort(single[l][e]):
                d1 = single[l][e, b]
                if not np.isfinite(d1) or time.perf_counter() > deadline:
                    break
                for m in range(L):
                    if m == l:
                        continue
                    cands = np.flatnonzero(st.p[m] == b)
                    d2 = single[m][cands, a]
                    for k in np.argsort(d2):
                        # Sorted, and the adjacent-layer correction below is >= 0: stop here.
                        if not np.isfinite(d2[k]) or d1 + d2[k] >= -tol:
                            break
                        g = cands[k]
                        # d1 assumed g still on b and d2 assumed e still on a; on adjacent layers
                        # their own pair moved from link[a, b] to link[b, a], not to 0 twice.
                        t_eg = st.T[l][e, g] if m == l + 1 else st.T[m][g, e] if m == l - 1 else 0.0
                        delta = d1 + d2[k] + t_eg * (st.link[a, b] + st.link[b, a])
                        if delta < -tol:
                            st.move(l, e, b)
                            st.move(m, g, a)
                            return 1
    return 0


def _parity_mip(st: _State, parity: int, tol: float, time_limit: float) -> int:
    """Re-place every layer of one parity at once, exactly; the other layers stay fixed.

    Layers of one parity share no transition pair, so with the others fixed the traffic is
    linear in where their experts go (the gain tables): a small assignment MIP under the load
    caps, 1..cap per rank and layer, and memory balance (each rank's count over these layers is
    what the fixed layers leave it). Returns 1 if it lowered the traffic, else 0.
    """
    L, E = st.p.shape
    R = st.R
    layers = [l for l in range(L) if l % 2 == parity]
    if not layers or time_limit <= 0.01:
        return 0
    others = [l for l in range(L) if l % 2 != parity]
    G = np.stack([st.gain_table(l) for l in layers])                  # [n, E, R]
    now = G[np.arange(len(layers))[:, None], np.arange(E)[None, :], st.p[layers]].sum()
    scale = max(np.abs(G).max(), 1e-300)
    X = np.arange(len(layers) * E * R).reshape(len(layers), E, R)
    rows = Rows()
    for i, l in enumerate(layers):
        for e in range(E):
            rows.add(X[i, e], np.ones(R), 1, 1)
        for r in range(R):
            rows.add(X[i, :, r], np.ones(E), 1, st.cap)
            rows.add(X[i, :, r], st.load[l], -np.inf, st.caps[l])
    M = L * E // R
    for r in range(R):
        rest = M - st.cnt[others, r].sum()
        rows.add(X[:, :, r], np.ones(X[:, :, r].size), rest, rest)
    warm = np.zeros(X.size)
    warm[X[np.arange(len(layers))[:, None], np.arange(E)[None, :], st.p[layers]]] = 1.0
    n = X.size
    x, _ = rows.solve(G.ravel() / scale, np.zeros(n), np.ones(n), np.ones(n, bool),
                      time_limit=time_limit, rel_gap=1e-6, warm=warm)
    if x is None or (G.ravel() * x).sum() >= now - tol:
        return 0
    new = x.reshape(X.shape).argmax(2)
    for i, l in enumerate(layers):
        for e in range(E):
            if new[i, e] != st.p[l, e]:
                st.move(l, e, int(new[i, e]))
    return 1


def refine_local(load, transitions, p, link, R, caps, cap, time_limit: float = 10.0):
    """Local search from ``p``: swaps, memory-keeping pairs of moves, then exact re-placement
    of all even (odd) layers at once (``_parity_mip``), until none improves or time runs out.

    Returns (placement, moves made, converged: True when no move improves, False on time out).
    """
    st = _State(load, transitions, p, link, R, caps, cap)
    tol = 1e-9 * max(traffic(transitions, p, link), 1e-300)
    deadline = time.perf_counter() + time_limit
    moves, converged = 0, False
    while time.perf_counter() < deadline:
        n = _swap_pass(st, tol)
        if n == 0:
            n = _pair_move_pass(st, tol, deadline)
        for parity in (0, 1):
            if n == 0:
                n = _parity_mip(st, parity, tol, deadline - time.perf_counter())
        if n == 0:
            converged = time.perf_counter() < deadline
            break
        moves += n
    return st.p, moves, converged


def joint_mip(load, transitions, link, node, R, caps, cap, warm=None, time_limit: float = 30.0,
              rel_gap: float = 1e-4):
    """Exact traffic-minimising placement under the constraints (module docstring); HiGHS.

    Returns (placement or None, info with objective, bound (valid lower bound on the traffic of
    every feasible placement), gap, status, time_s). Traffic in the units of ``link``.
    """
    L, E = load.shape
    M = L * E // R
    nodes = np.unique(node)
    per_node = len(nodes) > 1
    size = L * E * R + sum(np.count_nonzero(t) for t in transitions) * (R + per_node * len(nodes))
    if size > JOINT_MAX_COLS:
        return None, {"status": "skipped: too large", "cols": int(size)}
    off = link[~np.eye(R, dtype=bool)]
    c_rank = float(off.min()) if off.size else 0.0            # any cross-rank pair pays this ...
    c_node = float(off.max()) - c_rank if per_node else 0.0   # ... and a cross-node one this more
    scale = max(c_rank, 1e-300)
    Y = np.arange(L * E * R).reshape(L, E, R)
    cols = L * E * R
    cost = [np.zeros(cols)]
    const = 0.0
    rows = Rows()
    for l in range(L):
        for e in range(E):
            rows.add(Y[l, e], np.ones(R), 1, 1)
        for r in range(R):
            rows.add(Y[l, :, r], np.ones(E), 1, cap)
            rows.add(Y[l, :, r], load[l], -np.inf, caps[l])
    for r in range(R):
        rows.add(Y[:, :, r], np.ones(L * E), M, M)
    groups = [(c_rank, [[r] for r in range(R)])]
    if per_node:
        groups.append((c_node, [list(np.flatnonzero(node == n)) for n in nodes]))
    for c, parts in groups:
        if c <= 0:
            continue
        for l in range(L - 1):
            es, fs = np.nonzero(transitions[l])
            const += c * transitions[l].sum() / scale
            for part in parts:          # z <= (layer-l share on part), z <= (layer-l+1 share)
                Z = cols + np.arange(len(es))
                cols += len(es)
                cost.append(-c * transitions[l][es, fs] / scale)
                for i, (e, f) in enumerate(zip(es, fs)):
                    rows.add(np.r_[Z[i], Y[l, e, part]], np.r_[1.0, -np.ones(len(part))], -np.inf, 0)
                    rows.add(np.r_[Z[i], Y[l + 1, f, part]], np.r_[1.0, -np.ones(len(part))],
                             -np.inf, 0)
    cost = np.concatenate(cost)
    lower, upper = np.zeros(cols), np.ones(cols)
    integer = np.r_[np.ones(L * E * R, bool), np.zeros(cols - L * E * R, bool)]
    if per_node:
        # Ranks are interchangeable within the node structure (transitive on ranks), so some
        # optimum puts expert 0 of layer 0 on the warm start's rank for it.
        lower[Y[0, 0, int(warm[0, 0]) if warm is not None else 0]] = 1.0
    else:
        # On one node all R! labellings are equivalent: name the ranks in the order in which
        # layer 0's experts first use them (each rank holds one at least), i.e. expert e may
        # open rank r only if rank r-1 holds an earlier expert. This cuts R! symmetric copies.
        for e in range(E):
            for r in range(1, R):
                rows.add(np.r_[Y[0, e, r], Y[0, :e, r - 1]], np.r_[1.0, -np.ones(e)], -np.inf, 0)
        if warm is not None:
            first = [int(r) for r in dict.fromkeys(warm[0].tolist())]
            rename = np.empty(R, dtype=np.int64)
            rename[first] = np.arange(len(first))
            warm = rename[warm]
    x0 = None
    if warm is not None:
        x0 = np.zeros(cols)
        x0[Y[np.arange(L)[:, None], np.arange(E)[None, :], warm]] = 1.0
        k = L * E * R
        for c, parts in groups:
            if c <= 0:
                continue
            for l in range(L - 1):
                es, fs = np.nonzero(transitions[l])
                for part in parts:
                    x0[k:k + len(es)] = np.isin(warm[l, es], part) & np.isin(warm[l + 1, fs], part)
                    k += len(es)
    x, info = rows.solve(cost, lower, upper, integer, time_limit=time_limit, rel_gap=rel_gap,
                         warm=x0)
    info = {"status": info["status"], "objective": (info["objective"] + const) * scale,
            "bound": max((info["bound"] + const) * scale, 0.0), "time_s": info["time_s"],
            "cols": cols}
    info["gap"] = gap(info["objective"], info["bound"])
    if x is None:
        return None, info
    p = x[:L * E * R].reshape(L, E, R).argmax(2).astype(np.int64)
    return p, info


def refine(load, transitions, p, link, node, R, cap, min_balance: float = 0.95,
           time_limit: float = 30.0, joint: bool = True):
    """Stage 3: lower the traffic of placement ``p`` under the ILP's constraints; never worse.

    Returns (placement, info) with the traffic before/after, the local-search moves, and the
    joint MIP's status and ``bound`` when it ran (``None`` when the model was too large).
    """
    t0 = time.perf_counter()
    caps = layer_caps(load, p, R, min_balance)
    before = traffic(transitions, p, link)
    best, moves, conv = refine_local(load, transitions, p, link, R, caps, cap, 0.3 * time_limit)
    best_t = traffic(transitions, best, link)
    info = {"traffic_before": before, "traffic_local": best_t, "local_moves": moves,
            "local_converged": conv,
            "min_balance": min_balance, "bound": None, "joint": None}
    left = time_limit - (time.perf_counter() - t0)
    if joint and left > 0.05:
        q, j = joint_mip(load, transitions, link, node, R, caps, cap, best, left)
        info["joint"] = j
        if j.get("bound") is not None and "objective" in j:
            info["bound"] = j["bound"]
        if q is not None and traffic(transitions, q, link) < best_t:
            best, best_t = q, traffic(transitions, q, link)
    info["traffic_after"] = best_t
    info["gap"] = gap(best_t, info["bound"]) if info["bound"] is not None else None
    info["time_s"] = time.perf_counter() - t0
    return best, info
