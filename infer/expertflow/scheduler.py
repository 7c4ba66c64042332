"""ExpertFlow's token scheduler: regroup pending requests into batches whose predicted routes
are alike, so each batch activates fewer experts; callers put outputs back in input order.

Each request is a 0/1 route pattern over (layer, expert): the union of its tokens' predicted
experts. Similarity is 1 - Hamming distance / pattern length. Batches come from balanced
k-medoids: ceil(n / cap) medoids (farthest-point start from the request most like all others),
each request assigned, closest pairs first, to the nearest medoid with room (at most `cap`
members), then each medoid moved to the member nearest the rest; a few rounds until stable.
"""
import numpy as np


def hamming(patterns: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances [n, n] of 0/1 patterns [n, d]."""
    p = patterns.astype(np.int32)
    return p @ (1 - p).T + (1 - p) @ p.T


def _assign(dist: np.ndarray, medoids: list, cap: int) -> np.ndarray:
    n = dist.shape[0]
    label = np.full(n, -1)
    room = {m: cap for m in range(len(medoids))}
    pairs = sorted(((dist[i, c], i, m) for i in range(n) for m, c in enumerate(medoids)))
    for _, i, m in pairs:
        if label[i] < 0 and room[m] > 0:
            label[i] = m
            room[m] -= 1
    return label


def schedule(patterns: np.ndarray, cap: int, rounds: int = 10) -> list[list[int]]:
    """Batches (lists of request indices, each at most `cap`) grouping similar patterns."""
    n = patterns.shape[0]
    if cap < 1:
        raise ValueError(f"the batch cap must be >= 1 (got {cap})")
    if n <= cap:
        return [list(range(n))] if n else []
    dist = hamming(patterns)
    k = -(-n // cap)
    medoids = [int(dist.sum(1).argmin())]
    while len(medoids) < k:
        medoids.append(int(dist[:, medoids].min(1).argmax()))
    label = _assign(dist, medoids, cap)
    for _ in range(rounds):
        new = []
        for m in range(k):
            members = np.flatnonzero(label == m)
            new.append(int(members[dist[np.ix_(members, members)].sum(1).argmin()]))
        if new == medoids:
            break
        medoids = new
        label = _assign(dist, medoids, cap)
    return [sorted(np.flatnonzero(label == m).tolist()) for m in range(k) if (label == m).any()]


def in_order(batches: list[list[int]], outputs: list[list]) -> list:
    """Outputs of scheduled batches (outputs[j][i] for request batches[j][i]) in request order."""
    flat = {}
    for idx, outs in zip(batches, outputs):
        for i, o in zip(idx, outs):
            flat[i] = o
    return [flat[i] for i in range(len(flat))]
