"""Variable sequence-length curricula over decomposition buckets (METHODS.md §5).

Each optimiser step draws one bucket with probability proportional to
(batches left in that bucket) x weight; a bucket with no batches left drops out. Sampling
batches one at a time this way is the same as giving every batch an independent exponential
clock of rate w_k and running them in the order the clocks ring (the first of several
exponentials rings with probability rate / total rate, and memorylessness makes the rest a
fresh race), so a whole epoch's order is one argsort: no step depends on what a rank has seen,
only on (seed, epoch). With `num_cycles` C, every bucket's batches are split into C near-equal
parts and each cycle runs the race over its parts: favouring short buckets, each cycle then
goes from short to long.

Runs shorter than the data. With a `horizon` of H steps below the batches available, the
curriculum epoch is H steps: each bucket contributes its share of the H steps in proportion to
its batches (largest remainders), so the run sees the data's natural length mix and the whole
curriculum shape (all cycles) within its own length. Longer runs repeat the curriculum per epoch.

Weights (bucket exponents k = min..max, shortest first, n buckets):
  natural      1 for all                    (the data's own mix, in random order)
  grow_p2      2^(n-1), ..., 2, 1           (paper's Grow-P2: short first)
  grow_linear  n, n-1, ..., 1               (paper's Grow-Linear)
  weights      data.curriculum_weights      (explicit, one positive weight per bucket)
"""

import numpy as np

CURRICULA = ["natural", "grow_p2", "grow_linear", "weights"]


def bucket_weights(curriculum: str, n: int, explicit=()) -> np.ndarray:
    """Sampling weights of n buckets (shortest first) for a named curriculum."""
    if curriculum == "natural":
        return np.ones(n)
    if curriculum == "grow_p2":
        return 2.0 ** np.arange(n - 1, -1, -1)
    if curriculum == "grow_linear":
        return np.arange(n, 0, -1, dtype=np.float64)
    if curriculum == "weights":
        w = np.asarray(list(explicit), dtype=np.float64)
        if len(w) != n or not np.all(w > 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"data.curriculum_weights={list(explicit)} must hold {n} positive "
                             "numbers, one per bucket, shortest first")
        return w
    raise ValueError(f"data.curriculum={curriculum!r} is unknown: choose one of {CURRICULA}")


def epoch_order(batches, weights, num_cycles: int, rng: np.random.Generator) -> np.ndarray:
    """Bucket index of every step of one epoch (length sum(batches)); see the module docstring."""
    batches = np.asarray(batches, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    parts = []
    for c in range(num_cycles):
        count = batches * (c + 1) // num_cycles - batches * c // num_cycles
        items = np.repeat(np.arange(len(batches)), count)
        clocks = rng.standard_exponential(len(items)) / weights[items]
        parts.append(items[np.argsort(clocks, kind="stable")])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def apportion(batches: np.ndarray, horizon: int) -> np.ndarray:
    """Batches per bucket scaled to sum to `horizon` (largest remainders); unchanged when the
    horizon is 0 or not below their sum."""
    total = int(batches.sum())
    if horizon <= 0 or horizon >= total:
        return batches
    exact = batches * horizon / total
    out = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - out), kind="stable")[:horizon - int(out.sum())]
    out[extra] += 1
    return out


class Curriculum:
    """Which bucket, and which of its batches, every step uses; a pure function of (seed, step).

    Epoch e's order is `epoch_order(batches, weights, num_cycles, rng([seed, e]))`; the j-th
    step of bucket b in epoch e uses batch j of b's epoch-e permutation (the loader's job).
    `horizon` (e.g. train.steps) shortens the epoch to the run (see the module docstring).
    """

    def __init__(self, batches, weights, num_cycles: int, seed: int, horizon: int = 0):
        self.batches = apportion(np.asarray(batches, dtype=np.int64), horizon)
        self.weights = np.asarray(weights, dtype=np.float64)
        if num_cycles < 1:
            raise ValueError(f"data.num_cycles={num_cycles} must be >= 1")
        if len(self.weights) != len(self.batches):
            raise ValueError(f"{len(self.weights)} weights for {len(self.batches)} buckets")
        self.num_cycles, self.seed = num_cycles, seed
        self.steps_per_epoch = int(self.batches.sum())
        if self.steps_per_epoch < 1:
            raise ValueError("no bucket holds a whole batch: lower train.tokens_per_step or add data")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket index per step, index of that step's batch within its bucket) of epoch e."""
        hit = self._cache.get(e)
        if hit is None:
            order = epoch_order(self.batches, self.weights, self.num_cycles,
                                np.random.default_rng([self.seed, 0x5EED, e]))
            nth = np.empty_like(order)
            for b in range(len(self.batches)):
                sel = np.flatnonzero(order == b)
                nth[sel] = np.arange(len(sel))
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            hit = self._cache[e] = (order, nth)
        return hit

    def at(self, step: int) -> tuple[int, int, int]:
        """(bucket index, batch index within that bucket, epoch) of `step`."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        e, s = divmod(step, self.steps_per_epoch)
        order, nth = self.epoch(e)
        return int(order[s]), int(nth[s]), e

    def buckets(self, start: int, stop: int) -> np.ndarray:
        """Bucket index of every step in [start, stop) (for plots and tests)."""
        return np.array([self.at(s)[0] for s in range(start, stop)], dtype=np.int64)
