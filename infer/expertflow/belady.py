"""Belady's offline-optimal cache on a recorded expert trace: the hit-rate ceiling each online
policy (LRU, ExpertFlow's prefetch) is measured against.

A trace is one list per MoE layer of the expert sets its forwards needed, in order. Within a
forward the set is needed at once, so the cache must hold it; on a miss the expert evicted is
the resident one (outside the current set) whose next use lies farthest ahead.
"""


def belady_hits(trace: list[set], slots: int) -> tuple[int, int]:
    """(hits, accesses) of the optimal `slots`-slot cache on one layer's trace of expert sets."""
    uses = {}
    for t, s in enumerate(trace):
        for e in s:
            uses.setdefault(e, []).append(t)
    nxt = {e: 0 for e in uses}
    cache, hits, accesses = set(), 0, 0
    for t, need in enumerate(trace):
        for e in need:
            nxt[e] += 1  # uses[e][nxt[e]] is now e's next use after t
        for e in sorted(need):
            accesses += 1
            if e in cache:
                hits += 1
                continue
            if len(cache) >= slots:
                candidates = [c for c in cache if c not in need]
                if not candidates:  # the set is larger than the cache: it streams through
                    continue
                victim = max(candidates, key=lambda c: uses[c][nxt[c]] if nxt[c] < len(uses[c]) else float("inf"))
                cache.discard(victim)
            cache.add(e)
    return hits, accesses


def belady(traces: list[list[set]], slots: int) -> tuple[int, int]:
    """(hits, accesses) of the optimal cache over every layer's trace. accesses - hits is the
    fewest loads any policy needs for the trace, prefetching ones included (MIN is optimal in
    fetches), so it floors bytes moved; its hit rate caps only on-demand policies, since a
    prefetched expert counts as a hit while costing a load."""
    h = a = 0
    for trace in traces:
        hh, aa = belady_hits(trace, slots)
        h, a = h + hh, a + aa
    return h, a


def belady_hit_rate(traces: list[list[set]], slots: int) -> float:
    """Optimal on-demand hit rate over every layer's trace."""
    h, a = belady(traces, slots)
    return h / a if a else float("nan")
