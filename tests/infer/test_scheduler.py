"""The token scheduler groups requests with alike routes, caps every batch, and its outputs
return in input order; Belady's offline cache gives the known optimum on hand-built traces."""
import itertools

import numpy as np
import pytest

from kiln.infer.expertflow.belady import belady_hit_rate, belady_hits
from kiln.infer.expertflow.runtime import run_batches
from kiln.infer.expertflow.scheduler import hamming, in_order, schedule


def test_hamming_matches_a_direct_count():
    p = np.random.default_rng(0).integers(0, 2, (6, 20))
    d = hamming(p)
    for i, j in itertools.product(range(6), repeat=2):
        assert d[i, j] == (p[i] != p[j]).sum()


def test_alike_requests_share_batches_and_every_batch_respects_the_cap():
    rng = np.random.default_rng(1)
    a, b = np.zeros(32, int), np.zeros(32, int)
    a[:8], b[16:24] = 1, 1
    # two route families, interleaved in arrival order, each member with one flipped bit
    pats, family = [], []
    for i in range(12):
        base = (a if i % 2 == 0 else b).copy()
        base[rng.integers(32)] ^= 1
        pats.append(base)
        family.append(i % 2)
    batches = schedule(np.array(pats), cap=6)
    assert sorted(i for bt in batches for i in bt) == list(range(12))   # every request once
    assert all(len(bt) <= 6 for bt in batches)
    assert all(len({family[i] for i in bt}) == 1 for bt in batches)     # families kept apart
    for cap in (1, 4, 5, 12, 20):
        got = schedule(np.array(pats), cap)
        assert all(len(bt) <= cap for bt in got) and sorted(sum(got, [])) == list(range(12))
    with pytest.raises(ValueError):
        schedule(np.array(pats), 0)


def test_outputs_come_back_in_input_order():
    batches = [[3, 0], [2], [4, 1]]
    outs = [[f"o{i}" for i in bt] for bt in batches]
    assert in_order(batches, outs) == ["o0", "o1", "o2", "o3", "o4"]
    prompts = [[i] for i in range(7)]
    assert run_batches(prompts, 3, lambda ps: [p[0] * 10 for p in ps]) == [i * 10 for i in range(7)]


def test_belady_on_hand_built_traces():
    # 2 slots, accesses a b c a b: optimal evicts c's rival by next use -> hits on the 2nd a or b
    trace = [{0}, {1}, {2}, {0}, {1}]
    assert belady_hits(trace, 2) == (1, 5)
    assert belady_hits(trace, 3) == (2, 5)
    assert belady_hits([{0, 1}, {0, 1}, {0, 1}], 2) == (4, 6)
    # never below LRU on random traces
    rng = np.random.default_rng(0)
    for _ in range(20):
        tr = [set(rng.choice(8, 2, replace=False).tolist()) for _ in range(40)]
        lru, cache, hits = [], [], 0
        for need in tr:
            for e in sorted(need):
                if e in cache:
                    hits += 1
                    cache.remove(e)
                elif len(cache) >= 3:
                    cache.pop(next(i for i, c in enumerate(cache) if c not in need))
                cache.append(e)
        assert belady_hits(tr, 3)[0] >= hits
    assert belady_hit_rate([trace, trace], 2) == pytest.approx(0.2)
