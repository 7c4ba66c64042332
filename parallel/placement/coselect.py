"""The training objective of expert placement: co-locate experts that one token chooses together.

Under dedup dispatch (kiln.parallel.expert) a token is sent once per rank that holds any of its
top-k experts, and its outputs return summed, one row per rank. So in training, where every
token goes back to its home rank after each MoE layer, the rows a layer sends are

    rows(l) = sum over tokens of |{rank of c : c a choice of the token in layer l}|,

about (1 - 1/R) of them off the home rank. Cross-layer traffic (stage 2, the serving objective)
does not enter: tokens never stay on an expert's rank. With the profile's co-selection counts
C[l, e, f] (ordered pairs of distinct choices of one token), top_k = 2 gives exactly
rows(l) = tokens * 2 - kept(l) / 2 with kept(l) = sum of C[l, e, f] over pairs on one rank; for
top_k > 2, maximising the pairs kept is the pairwise (second-order inclusion-exclusion) surrogate.

``coselect_layer`` raises kept(l) for one layer by best-improvement swaps of two experts between
ranks (every rank keeps its expert count, so memory balance holds), each swap allowed only while
the layer's balancedness (mean / max rank load) stays >= ``floor``; from a few starts (the given
clustering, and the layer's groups of strongly co-selected experts packed greedily onto ranks) the
best is kept. ``coselect_stage`` runs it over all layers within a time budget.
"""
from __future__ import annotations

import time

import numpy as np


def kept_pairs(C: np.ndarray, slots: np.ndarray) -> float:
    """Co-selection pairs of one layer whose two experts share a slot (C [E, E], slots [E])."""
    return float(C[slots[:, None] == slots[None, :]].sum())


def _max_load(w, slots, R) -> float:
    return float(np.bincount(slots, w, R).max())


def swap_search(w: np.ndarray, C: np.ndarray, slots: np.ndarray, R: int, cap_load: float,
                max_rounds: int = 2000) -> np.ndarray:
    """Best-improvement swaps raising ``kept_pairs`` with every slot load <= cap_load (w: loads)."""
    slots = slots.copy()
    E = slots.shape[0]
    for _ in range(max_rounds):
        member = np.zeros((E, R))
        member[np.arange(E), slots] = 1.0
        G = C @ member                                # G[e, s]: pairs of e with slot s's experts
        a, b = slots[:, None], slots[None, :]
        own = G[np.arange(E), slots]
        # swap e (slot a) with f (slot b): e joins b without f, f joins a without e; kept pairs
        # change by twice this (C is symmetric)
        Gs = G[:, slots]                              # Gs[e, f] = G[e, slot of f]
        gain = Gs + Gs.T - own[:, None] - own[None, :] - 2.0 * C
        load = np.bincount(slots, w, R)
        diff = w[None, :] - w[:, None]                # a gets +diff, b gets -diff
        ok = (a != b) & (load[a] + diff <= cap_load) & (load[b] - diff <= cap_load)
        gain = np.where(ok, gain, -np.inf)
        e, f = np.unravel_index(gain.argmax(), gain.shape)
        if not gain[e, f] > 1e-9 * max(C.max(), 1e-30):
            break
        slots[e], slots[f] = slots[f], slots[e]
    return slots


def group_start(w: np.ndarray, C: np.ndarray, sizes: np.ndarray, cap_load: float) -> np.ndarray | None:
    """Slots filled one at a time with the expert most co-selected with the slot so far (the
    heaviest free expert seeds each slot), within the slot's size and load cap; None if stuck."""
    E, R = w.shape[0], sizes.shape[0]
    slots = np.full(E, -1, dtype=np.int64)
    load = np.zeros(R)
    for s in np.argsort(-sizes, kind="stable"):
        for i in range(int(sizes[s])):
            free = slots < 0
            fits = free & (load[s] + w <= cap_load)
            if not fits.any():
                fits = free                               # take the lightest; swaps repair it
                score = -w
            else:
                score = C[:, slots == s].sum(1) if i else w
            e = int(np.argmax(np.where(fits, score + 1e-12 * w, -np.inf)))
            slots[e], load[s] = s, load[s] + w[e]
    return slots if (slots >= 0).all() else None


def perturb(w: np.ndarray, slots: np.ndarray, R: int, cap_load: float, swaps: int, rng) -> np.ndarray:
    """``swaps`` random swaps of two experts on different slots that keep every load <= cap_load."""
    slots = slots.copy()
    load = np.bincount(slots, w, R)
    for _ in range(swaps):
        for _ in range(20):                                 # a few tries to find a feasible one
            e, f = rng.choice(slots.shape[0], 2, replace=False)
            a, b = slots[e], slots[f]
            d = w[f] - w[e]
            if a != b and load[a] + d <= cap_load and load[b] - d <= cap_load:
                slots[e], slots[f] = b, a
                load[a], load[b] = load[a] + d, load[b] - d
                break
    return slots


def coselect_layer(w: np.ndarray, C: np.ndarray, slots: np.ndarray, R: int, floor: float,
                   kicks: int = 40, seed: int = 0) -> np.ndarray:
    """One layer's slots with more co-selection kept, every slot size unchanged and balancedness
    >= min(floor, the input's). w: expert loads of the layer, C: its co-selection counts.
    Iterated local search: swap search from the input and from ``group_start``, then ``kicks``
    rounds of a few random feasible swaps followed by swap search, keeping the best (seeded)."""
    mean = w.sum() / R
    cur = mean / max(_max_load(w, slots, R), 1e-30)
    cap_load = mean / max(min(floor, cur), 1e-12) * (1 + 1e-12)
    sizes = np.bincount(slots, minlength=R)
    best = swap_search(w, C, slots, R, cap_load)
    start = group_start(w, C, sizes, cap_load)
    if start is not None:
        start = swap_search(w, C, start, R, cap_load)
        if _max_load(w, start, R) <= cap_load and kept_pairs(C, start) > kept_pairs(C, best):
            best = start
    rng = np.random.default_rng(seed)
    cur_s, cur_k = best, kept_pairs(C, best)
    for _ in range(kicks):
        cand = swap_search(w, C, perturb(w, cur_s, R, cap_load, max(2, slots.shape[0] // 8), rng), R, cap_load)
        k = kept_pairs(C, cand)
        if k >= cur_k:                                      # accept sideways moves too
            cur_s, cur_k = cand, k
            if k > kept_pairs(C, best):
                best = cand
    return best


def coselect_stage(load: np.ndarray, coselect: np.ndarray, slots: np.ndarray, R: int,
                   floor: float, seed: int = 0):
    """``coselect_layer`` for every layer; returns (slots, info). A fixed amount of search per
    layer (no time budget), so the result does not depend on the machine's speed."""
    t0 = time.perf_counter()
    slots = slots.copy()
    before = sum(kept_pairs(coselect[l], slots[l]) for l in range(len(slots)))
    done = 0
    for l in range(len(slots)):
        slots[l] = coselect_layer(load[l], coselect[l], slots[l], R, floor, seed=seed + l)
        done += 1
    after = sum(kept_pairs(coselect[l], slots[l]) for l in range(len(slots)))
    total = float(coselect.sum())
    return slots, {"kept_pairs_before": before, "kept_pairs": after, "pairs": total,
                   "kept_fraction": after / total if total > 0 else 0.0, "layers": done,
                   "floor": floor, "time_s": time.perf_counter() - t0}
