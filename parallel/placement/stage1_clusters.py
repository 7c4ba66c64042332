"""MoETuner stage 1 (balanced clustering) solved with HiGHS, plus the MIP and assignment helpers.

Stage 1 clusters every layer's experts into R *slots* (a slot becomes a rank in stage 2):
minimise sum over layers and slots of |slot load - mean load| (linearised with
d[l,s] >= +-(load - mean)); every expert in one slot; slots non-empty and at most
``max_per_rank_layer`` experts per layer; and, for global memory balance, every slot holds L*E/R
experts over the whole model. Loads are scaled by the layer mean (objective in mean-rank-loads).

How it is solved (small per-layer MIPs, E*R binaries each, instead of one big MIP):
  1. each layer alone, without the memory coupling: its optimum and HiGHS's dual bound. The sum of
     these bounds is a valid bound for the coupled problem; the reported gap is measured against
     it. Valid cuts make it tight: a slot holding expert e (and at least size_lo-1 of the lightest
     others) deviates by at least w_e + fill - 1, and deviations sum to >= 2 x the total excess.
     Greedy LPT + move/swap local search gives each MIP a warm start.
  2. memory: the clusters of each layer are spread over slots so slot totals come near L*E/R
     (LPT on cluster sizes + swaps), the rest is repaired by moving single experts between slots
     where it costs the least balance; layers left above their share of the target gap are
     re-solved with their slot sizes fixed. If the whole gap is still above target (and the model
     has at most 20000 binaries), the memory-coupled MIP over all layers is run, warm-started.
  3. (``align``, kiln's addition) each layer is re-solved with its slot sizes fixed to keep the
     most transition traffic inside the slots of its neighbour layers, with its balance allowed
     to grow only by a share of the slack under the target gap; the stage-1 gap stays
     <= max(target, gap before alignment), and stage 2 gets clusters worth keeping together.
"""
from __future__ import annotations

import time

import numpy as np

from kiln.parallel.placement.io import PlacementError
from kiln.parallel.placement.metrics import one_hot
from kiln.parallel.placement.mip import Rows, gap


# ----------------------------------------------------------------------------------- stage 1
def _layer_rows(rows: Rows, X: np.ndarray, D: np.ndarray, w: np.ndarray, size_lo, size_hi):
    """One layer's clustering rows: X [E, R] slot binaries, D [R] deviation columns."""
    E, R = X.shape
    for e in range(E):
        rows.add(X[e], np.ones(R), 1, 1)                         # expert in exactly one slot
    srt = np.sort(w)
    for s in range(R):
        rows.add(X[:, s], np.ones(E), size_lo[s], size_hi[s])    # non-empty, cap, memory window
        rows.add(np.r_[X[:, s], D[s]], np.r_[w, -1.0], -np.inf, 1.0)   # load - d <= mean
        rows.add(np.r_[X[:, s], D[s]], np.r_[w, 1.0], 1.0, np.inf)     # load + d >= mean
        # If e sits in s, s also holds size_lo-1 others, at least the lightest ones: its load is
        # >= w_e + fill, so d_s >= (w_e + fill - 1) x[e, s] (valid, and tight at integer points).
        k = int(size_lo[s]) - 1
        fill = srt[:k].sum() + np.where(w <= srt[k - 1], srt[k] - w, 0.0) if k > 0 else np.zeros(E)
        for e in np.flatnonzero(w + fill > 1.0):
            rows.add([D[s], X[e, s]], [1.0, -(w[e] + fill[e] - 1.0)], 0.0, np.inf)
    excess = np.clip(w - 1.0, 0, None).sum()
    if excess > 0:
        rows.add(D, np.ones(R), 2.0 * excess, np.inf)            # deviations pair up: >= 2 x excess


def _balance(w: np.ndarray, slots: np.ndarray, R: int) -> float:
    return float(np.abs(np.bincount(slots, w, R) - 1.0).sum())


def cluster_layer(w: np.ndarray, size_lo: np.ndarray, size_hi: np.ndarray, time_limit: float,
                  rel_gap: float, align: np.ndarray | None = None, allowed: float | None = None,
                  warm: np.ndarray | None = None, seed: int = 0, abs_gap: float = 1e-6):
    """One layer's clustering MIP over R slots (E*R binaries).

    ``w`` [E]: loads scaled to a mean slot load of 1. Slot s holds between size_lo[s] and
    size_hi[s] experts. Without ``align``: minimise sum_s |load_s - 1|. With ``align`` [R, E]
    (traffic kept if expert e joins slot s) and ``allowed``: maximise kept traffic subject to
    sum_s |load_s - 1| <= allowed. Returns (slot of each expert [E] or None, info).
    """
    E, R = w.shape[0], size_lo.shape[0]
    # A slot gets at least what the others cannot hold (tightens the fill cut, e.g. equal sizes).
    size_lo = np.maximum(size_lo, E - (size_hi.sum() - size_hi))
    X = np.arange(E * R).reshape(E, R)
    D = E * R + np.arange(R)
    rows = Rows()
    _layer_rows(rows, X, D, w, size_lo, size_hi)
    if align is None:
        for s in range(R - 1):                                   # interchangeable slots: order loads
            if size_lo[s] == size_lo[s + 1] and size_hi[s] == size_hi[s + 1]:
                rows.add(np.r_[X[:, s], X[:, s + 1]], np.r_[w, -w], 0.0, np.inf)
        cost = np.r_[np.zeros(E * R), np.ones(R)]
    else:
        rows.add(D, np.ones(R), -np.inf, allowed)
        cost = np.r_[-(align.T / max(align.max(), 1e-12)).ravel(), np.zeros(R)]
    warm_x = None
    if warm is not None:
        if align is None:
            warm = _order_slots(warm, w, size_lo, size_hi)
        xw = one_hot(warm, R)
        warm_x = np.r_[xw.ravel(), np.abs(w @ xw - 1.0)]
    x, info = rows.solve(cost, np.zeros(E * R + R), np.r_[np.ones(E * R), np.full(R, np.inf)],
                         np.r_[np.ones(E * R, bool), np.zeros(R, bool)], time_limit=time_limit,
                         rel_gap=rel_gap, warm=warm_x, seed=seed,
                         abs_gap=abs_gap if align is None else 1e-6)
    if x is None:
        return None, info
    slots = x[:E * R].reshape(E, R).argmax(1)
    info["balance"] = _balance(w, slots, R)
    return slots, info


def cluster_joint(w: np.ndarray, R: int, cap: int, time_limit: float, rel_gap: float,
                  warm: np.ndarray, seed: int = 0):
    """The memory-coupled stage-1 MIP over all layers at once (L*E*R binaries), warm-started."""
    L, E = w.shape
    M = L * E // R
    X = np.arange(L * E * R).reshape(L, E, R)
    D = L * E * R + np.arange(L * R).reshape(L, R)
    rows = Rows()
    lo = max(1, E - (R - 1) * cap)
    for l in range(L):
        _layer_rows(rows, X[l], D[l], w[l], np.full(R, lo), np.full(R, cap))
    for s in range(R):
        rows.add(X[:, :, s], np.ones(L * E), M, M)               # memory balance per slot
    for s in range(R - 1):                                       # slots are interchangeable as a
        rows.add(np.r_[X[0, :, s], X[0, :, s + 1]], np.r_[w[0], -w[0]], 0.0, np.inf)  # whole
    order = np.argsort(-np.bincount(warm[0], w[0], R), kind="stable")
    relabel = np.empty(R, dtype=np.int64)
    relabel[order] = np.arange(R)
    warm = relabel[warm]
    xw = np.stack([one_hot(warm[l], R) for l in range(L)])
    warm_x = np.r_[xw.ravel(), np.abs(np.einsum("le,ler->lr", w, xw) - 1.0).ravel()]
    n = L * E * R
    x, info = rows.solve(np.r_[np.zeros(n), np.ones(L * R)], np.zeros(n + L * R),
                         np.r_[np.ones(n), np.full(L * R, np.inf)],
                         np.r_[np.ones(n, bool), np.zeros(L * R, bool)], time_limit=time_limit,
                         rel_gap=rel_gap, warm=warm_x, seed=seed)
    return (None if x is None else x[:n].reshape(L, E, R).argmax(2)), info


def _order_slots(slots: np.ndarray, w: np.ndarray, size_lo, size_hi) -> np.ndarray:
    """Relabel interchangeable slots (equal size bounds) so their loads descend (symmetry rows)."""
    R = size_lo.shape[0]
    load = np.bincount(slots, w, R)
    relabel = np.arange(R)
    s = 0
    while s < R:
        t = s
        while t + 1 < R and size_lo[t + 1] == size_lo[s] and size_hi[t + 1] == size_hi[s]:
            t += 1
        group = np.arange(s, t + 1)
        relabel[group[np.argsort(-load[group], kind="stable")]] = group
        s = t + 1
    return relabel[slots]


def greedy_partition(w: np.ndarray, size_lo: np.ndarray, size_hi: np.ndarray) -> np.ndarray:
    """Warm start for ``cluster_layer``: LPT within the size bounds, then move/swap local search."""
    E, R = w.shape[0], size_lo.shape[0]
    slots = np.empty(E, dtype=np.int64)
    load, count = np.zeros(R), np.zeros(R, dtype=np.int64)
    order = np.argsort(-w, kind="stable")
    for i, e in enumerate(order):
        deficit = np.clip(size_lo - count, 0, None)
        room = count < size_hi
        # Once the experts left only just fill the minimum sizes, they must go to short slots.
        ok = (deficit > 0) if E - i <= deficit.sum() else room
        s = int(np.argmin(np.where(ok, load, np.inf)))
        slots[e] = s
        load[s] += w[e]
        count[s] += 1
    return improve_partition(w, slots, size_lo, size_hi)


def improve_partition(w, slots, size_lo, size_hi, max_rounds: int = 500) -> np.ndarray:
    """Best-improvement moves and swaps of single experts that lower sum_s |load_s - 1|."""
    R = size_lo.shape[0]
    slots = slots.copy()
    for _ in range(max_rounds):
        load = np.bincount(slots, w, R)
        count = np.bincount(slots, minlength=R)
        dev = np.abs(load - 1.0)
        la, lb = load[slots][:, None], load[None, :]                     # move e: slot(e) -> b
        gain = dev[slots][:, None] + dev[None, :] - np.abs(la - w[:, None] - 1) - np.abs(lb + w[:, None] - 1)
        ok = (count[slots] > size_lo[slots])[:, None] & (count < size_hi)[None, :]
        ok &= slots[:, None] != np.arange(R)[None, :]
        gain = np.where(ok, gain, -np.inf)
        # swap e (in a) with f (in b): a gets -w_e + w_f, b gets +w_e - w_f
        a, b = slots[:, None], slots[None, :]
        diff = w[None, :] - w[:, None]
        sgain = dev[a] + dev[b] - np.abs(load[a] + diff - 1) - np.abs(load[b] - diff - 1)
        sgain = np.where(a != b, sgain, -np.inf)
        mv, sw = gain.max(), sgain.max()
        if max(mv, sw) <= 1e-12:
            break
        if mv >= sw:
            e, t = np.unravel_index(gain.argmax(), gain.shape)
            slots[e] = t
        else:
            e, f = np.unravel_index(sgain.argmax(), sgain.shape)
            slots[e], slots[f] = slots[f], slots[e]
    return slots


def check_feasible(L: int, E: int, R: int, cap: int | None):
    """Raise PlacementError (one line) if no ILP placement can exist for this request."""
    if R < 1 or E < 1 or L < 1:
        raise PlacementError(f"need L, E, R >= 1 (got L={L}, E={E}, R={R})")
    if (L * E) % R:
        raise PlacementError(f"memory balance impossible: L*E = {L * E} experts do not divide "
                             f"over {R} ranks; pick an expert-parallel size dividing {L * E}")
    if R > E:
        raise PlacementError(f"{R} ranks but only {E} experts per layer: every rank needs a "
                             f"non-empty cluster in every layer; use at most {E} ranks")
    if cap is not None and cap * R < E:
        raise PlacementError(f"max_per_rank_layer={cap} x {R} ranks < {E} experts per layer; "
                             f"raise it to at least {-(-E // R)}")


def improve_alignment(w, slots, A, allowed: float, max_rounds: int = 1000) -> np.ndarray:
    """Best-improvement swaps raising kept traffic sum A[slot(e), e], balance kept <= allowed."""
    R = A.shape[0]
    slots = slots.copy()
    for _ in range(max_rounds):
        load = np.bincount(slots, w, R)
        dev = np.abs(load - 1.0)
        a, b = slots[:, None], slots[None, :]
        own = A[slots, np.arange(len(slots))]
        gain = A[slots].T + A[slots] - own[:, None] - own[None, :]    # swap e (in a) with f (in b)
        diff = w[None, :] - w[:, None]
        bal = dev.sum() - dev[a] - dev[b] + np.abs(load[a] + diff - 1) + np.abs(load[b] - diff - 1)
        gain = np.where((a != b) & (bal <= allowed), gain, -np.inf)
        e, f = np.unravel_index(gain.argmax(), gain.shape)
        if gain[e, f] <= 1e-12 * max(A.max(), 1e-30):
            break
        slots[e], slots[f] = slots[f], slots[e]
    return slots


def arrange_slots(sizes: list, M: int, R: int) -> list:
    """Per layer, a slot for each cluster so slot totals come close to M (LPT, then swaps)."""
    L = len(sizes)
    perm = [None] * L                                            # perm[l][cluster] = slot
    total = np.zeros(R, dtype=np.int64)
    for l in np.argsort([-np.ptp(s) for s in sizes], kind="stable"):
        perm[l] = np.empty(R, dtype=np.int64)
        perm[l][np.argsort(-sizes[l], kind="stable")] = np.argsort(total, kind="stable")
        total[perm[l]] += sizes[l]
    for _ in range(100 * L):                                     # best swap of two slots' clusters
        best, move = 0, None
        for l in range(L):
            held = np.empty(R, dtype=np.int64)
            held[perm[l]] = sizes[l]                            # size in each slot
            d = held[None, :] - held[:, None]                   # slot a gets +d[a, b], b gets -d
            new = np.abs(total[:, None] + d - M) + np.abs(total[None, :] - d - M)
            gain = np.abs(total[:, None] - M) + np.abs(total[None, :] - M) - new
            a, b = np.unravel_index(gain.argmax(), gain.shape)
            if gain[a, b] > best:
                best, move = gain[a, b], (l, a, b)
        if move is None:
            break
        l, a, b = move
        ca, cb = np.flatnonzero(perm[l] == a)[0], np.flatnonzero(perm[l] == b)[0]
        total[a] += sizes[l][cb] - sizes[l][ca]
        total[b] += sizes[l][ca] - sizes[l][cb]
        perm[l][ca], perm[l][cb] = b, a
    return perm


def repair_memory(w: np.ndarray, slots: np.ndarray, R: int, cap: int) -> np.ndarray:
    """Move single experts from slots above L*E/R to slots below it, cheapest balance loss first."""
    L, E = slots.shape
    M = L * E // R
    slots = slots.copy()
    while True:
        total = np.bincount(slots.ravel(), minlength=R)
        over, under = total > M, total < M
        if not over.any():
            return slots
        best, move = np.inf, None
        for l in range(L):
            load, size = np.bincount(slots[l], w[l], R), np.bincount(slots[l], minlength=R)
            src = over[slots[l]] & (size[slots[l]] > 1)          # [E] experts that may leave
            dst = under & (size < cap)                           # [R] slots that may take one
            if not src.any() or not dst.any():
                continue
            a = slots[l]
            delta = (np.abs(load[a] - w[l] - 1) - np.abs(load[a] - 1))[:, None] + \
                np.abs(load[None, :] + w[l][:, None] - 1) - np.abs(load[None, :] - 1)
            delta = np.where(src[:, None] & dst[None, :], delta, np.inf)
            e, b = np.unravel_index(delta.argmin(), delta.shape)
            if delta[e, b] < best:
                best, move = delta[e, b], (l, e, b)
        if move is None:
            raise PlacementError("cannot balance expert memory within the per-layer cap; raise "
                                 "max_per_rank_layer")
        slots[move[0], move[1]] = move[2]


ALIGN_S = 0.3   # seconds per alignment MIP: past this HiGHS rarely beats the swap heuristic


def stage1_clusters(load: np.ndarray, transitions: np.ndarray | None, R: int, cap: int,
                    time_limit: float, target_gap: float, abs_tol: float = 0.01, seed: int = 0):
    """Balanced clustering of every layer into R slots, memory-balanced per slot.

    ``transitions`` (or None for the paper's balance-only form) enables step 4 (alignment).
    ``abs_tol``: a layer within this many mean-rank-loads of its bound counts as solved (this
    keeps near-perfectly balanced layers from spending the budget on a meaningless relative gap).
    Returns (slots [L, E], info) with objective/bound in mean-rank-loads and tokens.
    """
    t0 = time.perf_counter()
    if target_gap <= 0:
        abs_tol = 0.0                                           # a zero target asks for a proof
    L, E = load.shape
    M = L * E // R
    mean = load.sum(1) / R
    w = load / np.where(mean > 0, mean, 1.0)[:, None]
    left = lambda: time_limit - (time.perf_counter() - t0)  # noqa: E731
    one, capv = np.ones(R, dtype=np.int64), np.full(R, cap, dtype=np.int64)
    free, bound, n_opt = [], np.zeros(L), 0
    for l in range(L):                                          # 1. each layer alone
        warm = greedy_partition(w[l], one, capv)
        s, info = cluster_layer(w[l], one, capv, max(0.3 * left() / (L - l), 0.05),
                                target_gap / 4, warm=warm, seed=seed, abs_gap=abs_tol)
        free.append(warm if s is None else s)
        bound[l] = max(info["bound"], 0.0)
        n_opt += info["status"] == "Optimal"
    times = {"free": time.perf_counter() - t0}
    sizes = [np.bincount(s, minlength=R) for s in free]        # 2. arrange, repair, polish
    perm = arrange_slots(sizes, M, R)
    slots = repair_memory(w, np.stack([perm[l][free[l]] for l in range(L)]), R, cap)
    size = np.stack([np.bincount(s, minlength=R) for s in slots])
    allowed = bound / (1.0 - target_gap) + 1e-9
    polished, t_polish = 0, 0.2 * left()
    for l in range(L):
        slots[l] = improve_partition(w[l], slots[l], size[l], size[l])
        if _balance(w[l], slots[l], R) > allowed[l] and left() > 0:
            s, _ = cluster_layer(w[l], size[l], size[l], max(t_polish / L, 0.05), target_gap / 4,
                                 warm=slots[l], seed=seed, abs_gap=abs_tol)
            if s is not None and _balance(w[l], s, R) < _balance(w[l], slots[l], R):
                slots[l], polished = s, polished + 1
    balance = np.array([_balance(w[l], slots[l], R) for l in range(L)])
    times["polish"] = time.perf_counter() - t0 - sum(times.values())
    joint = None                                                # 3. whole-model MIP if still short
    if gap(balance.sum(), bound.sum()) > target_gap and (balance - bound).sum() > abs_tol * L \
            and L * E * R <= 20000 and left() > 0.1:
        s, joint = cluster_joint(w, R, cap, 0.3 * left(), target_gap, slots, seed)
        if s is not None and sum(_balance(w[l], s[l], R) for l in range(L)) < balance.sum() - 1e-9:
            slots = s
            size = np.stack([np.bincount(x, minlength=R) for x in slots])
            balance = np.array([_balance(w[l], slots[l], R) for l in range(L)])
        if joint["bound"] > bound.sum():                        # a better bound of the whole sum
            bound *= joint["bound"] / max(bound.sum(), 1e-12)
    times["joint"] = time.perf_counter() - t0 - sum(times.values())
    aligned, align_gap = 0, 0.0
    if transitions is not None and L > 1:                       # 4. alignment with neighbours
        # The slack left under the target gap is shared out in proportion to the layer bounds,
        # so the whole stage-1 gap stays <= max(target, gap before alignment).
        slack = max(bound.sum() / (1.0 - target_gap) - balance.sum(), 0.0)
        share = bound / bound.sum() if bound.sum() > 0 else np.full(L, 1.0 / L)
        allowed = balance + slack * share + 1e-9
        for rnd in range(2):
            for l in range(1 - rnd, L):
                if left() <= 0:
                    break
                A = np.zeros((R, E))                            # traffic kept if e joins slot s
                if l > 0:
                    A += one_hot_rows(slots[l - 1], R) @ transitions[l - 1]
                if rnd == 1 and l < L - 1:
                    A += (transitions[l] @ one_hot_rows(slots[l + 1], R).T).T
                warm = improve_alignment(w[l], slots[l], A, allowed[l])
                s, info = cluster_layer(w[l], size[l], size[l], min(left() / (2 * L - l), ALIGN_S),
                                        target_gap, align=A, allowed=allowed[l], warm=warm, seed=seed)
                slots[l] = warm if s is None else s
                aligned += 1
                align_gap = max(align_gap, info["gap"] if s is not None else 1.0)
        balance = np.array([_balance(w[l], slots[l], R) for l in range(L)])
    times["align"] = time.perf_counter() - t0 - sum(times.values())
    obj, bnd = float(balance.sum()), float(bound.sum())
    info = {"phase_time_s": times, "objective": obj, "bound": bnd, "gap": gap(obj, bnd),
            "objective_tokens": float((balance * mean).sum()),
            "abs_gap_tokens": float(((balance - bound) * mean).sum()),
            "abs_gap_per_layer": float((obj - bnd) / L),
            "free_layers_optimal": int(n_opt), "layers_polished": polished,
            "joint_mip": None if joint is None else {k: joint[k] for k in ("status", "gap", "time_s")},
            "layers_aligned": aligned, "align_gap_max": align_gap,
            "time_s": time.perf_counter() - t0}
    return slots, info


def one_hot_rows(assign: np.ndarray, R: int) -> np.ndarray:
    """[E] slot ids -> [R, E] 0/1 membership."""
    m = np.zeros((R, assign.shape[0]))
    m[assign, np.arange(assign.shape[0])] = 1.0
    return m
