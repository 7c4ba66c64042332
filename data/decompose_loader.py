"""Variable-length batches from decomposition buckets: constant tokens per step, one bucket a step.

A step of bucket 2^k holds tokens_per_step / 2^k rows of 2^k tokens, each row one chunk (one
document piece), so there is no padding and no document mask. Labels are the next token; a
chunk's last label is the document token after it (stored at prepare time), or -100 where the
chunk ends its document. position_ids are 0..2^k-1 (needed when sequence parallelism shards
rows); there are no doc_ids.

Which rows a rank takes. Every rank computes the same bucket for a step (Curriculum, a pure
function of (seed, step)), then:
  - data-parallel steps: the step's rows are split over all `world` ranks (and micro-steps);
  - sequence-parallel steps (sp > 1 and 2^k >= sp_min_len): split over the world // sp groups
    of sp consecutive ranks; the ranks of a group load the same rows and shard them along the
    sequence (kiln.parallel.sequence.shard_batch).
Either way every rank holds tokens_per_step / (world * grad_accum) tokens per micro-step.

Order: bucket b's chunks are permuted per (curriculum) epoch e by rng([seed, k, e]); the j-th
step of bucket b in epoch e takes rows [j * rows, (j + 1) * rows) of that permutation. Chunks
left over wait for a later epoch's permutation. Nothing depends on history: resume is exact.
"""
from __future__ import annotations  # torch.Tensor in annotations: torch loads with the first batch

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .curriculum import Curriculum
from .indexed import read_documents
from .errors import DataError

if TYPE_CHECKING:
    import torch


def uses_sp(seq_len: int, sp: int, sp_min_len: int) -> bool:
    """Whether a batch of this length runs sequence-parallel (the one rule, shared by all)."""
    return sp > 1 and seq_len >= sp_min_len


def check_layout(tokens_per_step: int, buckets, world: int, sp: int = 1, sp_min_len: int = 0,
                 grad_accum: int = 1) -> None:
    """ValueError (one line) unless every bucket's step splits into whole rows on every rank."""
    lo, hi = buckets
    need = 1
    for k in range(lo, hi + 1):
        length = 1 << k
        on = uses_sp(length, sp, sp_min_len)
        if on and length % (2 * sp):
            raise ValueError(f"bucket 2^{k}={length} is not divisible by 2 * parallel.sp = {2 * sp} "
                             "for the zigzag layout: raise data.buckets[0] or parallel.sp_min_len")
        need = np.lcm(need, length * (world // sp if on else world) * grad_accum)
    if tokens_per_step < 1 or tokens_per_step % need:
        raise ValueError(f"train.tokens_per_step={tokens_per_step} does not split into whole rows of "
                         f"every bucket 2^{lo}..2^{hi} over {world} ranks (sp={sp}) x {grad_accum} "
                         f"micro-steps: make it a multiple of {int(need)}")


@dataclass(frozen=True)
class StepPlan:
    """What step `step` is made of."""

    step: int
    bucket: int        # exponent k: rows are 2^k tokens
    seq_len: int       # 2^k
    rows: int          # rows of the whole step, all ranks and micro-steps
    local_rows: int    # rows this rank loads per micro-step (before sequence sharding)
    sp: bool           # True: sequence-parallel step
    epoch: int
    index: int         # which batch of its bucket in this epoch


def load_bucket(prefix: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(chunks [n, 2^k], next token after each chunk) of one bucket's indexed dataset, checked."""
    tokens, starts, ends = read_documents(prefix)
    if np.any(ends - starts != 1 << k):
        raise DataError(f"{prefix} holds chunks that are not 2^{k} tokens long: run `kiln prepare` again")
    nxt = np.load(prefix + ".next.npy", mmap_mode="r")
    if len(nxt) != len(starts):
        raise DataError(f"{prefix}.next.npy has {len(nxt)} entries for {len(starts)} chunks: "
                        "run `kiln prepare` again")
    return tokens.reshape(len(starts), 1 << k), nxt


def chunk_batch(tokens: np.ndarray, nxt: np.ndarray, k: int, chunks: np.ndarray) -> dict[str, torch.Tensor]:
    """The batch made of the given chunks of bucket 2^k (one row each): input_ids, labels
    (the next token; a chunk's last label is the token after it or -100), position_ids."""
    import torch
    chunks = np.sort(np.asarray(chunks, dtype=np.int64))  # sorted reads are sequential on disk
    rows = tokens[chunks].astype(np.int64)
    labels = np.empty_like(rows)
    labels[:, :-1] = rows[:, 1:]
    labels[:, -1] = nxt[chunks]
    pos = np.tile(np.arange(1 << k, dtype=np.int64), (len(chunks), 1))
    return {"input_ids": torch.from_numpy(rows), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos)}


class DecomposeLoader:
    """Batches over per-bucket indexed datasets (see the module docstring); a BatchSource."""

    # Ranks hold different numbers of valid labels in a step (rows of 2^k, sequence shards,
    # chunk-end -100s), so a mean of per-rank means would weigh labels unequally.
    global_token_mean = True

    def __init__(self, prefixes: dict[int, str], tokens_per_step: int, rank: int, world: int, *,
                 sp: int = 1, sp_min_len: int = 0, seed: int = 0, grad_accum: int = 1,
                 weights=None, num_cycles: int = 8, horizon: int = 0):
        ks = sorted(prefixes)
        if ks != list(range(ks[0], ks[-1] + 1)):
            raise ValueError(f"bucket exponents {ks} must be consecutive")
        if not 0 <= rank < world or world % sp:
            raise ValueError(f"rank {rank} of world {world} with sp={sp} is not a valid layout")
        check_layout(tokens_per_step, (ks[0], ks[-1]), world, sp, sp_min_len, grad_accum)
        self.ks, self.tokens_per_step = ks, tokens_per_step
        self.rank, self.world, self.sp, self.sp_min_len = rank, world, sp, sp_min_len
        self.seed, self.grad_accum = seed, grad_accum
        self._tokens, self._next = {}, {}
        for k in ks:
            self._tokens[k], self._next[k] = load_bucket(prefixes[k], k)
        self.chunks = np.array([len(self._tokens[k]) for k in ks], dtype=np.int64)
        self.rows = np.array([tokens_per_step >> k for k in ks], dtype=np.int64)
        w = np.ones(len(ks)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.curriculum = Curriculum(self.chunks // self.rows, w, num_cycles, seed, horizon)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one curriculum epoch: the horizon, or until every bucket runs out of batches."""
        return self.curriculum.steps_per_epoch

    def plan(self, step: int) -> StepPlan:
        """Bucket, sizes and layout of `step`."""
        b, j, e = self.curriculum.at(step)
        k = self.ks[b]
        on = uses_sp(1 << k, self.sp, self.sp_min_len)
        ranks = self.world // self.sp if on else self.world
        rows = int(self.rows[b])
        return StepPlan(step=step, bucket=k, seq_len=1 << k, rows=rows,
                        local_rows=rows // (ranks * self.grad_accum), sp=on, epoch=e, index=j)

    def row_len(self, step: int) -> int:
        """2^k of the step's bucket."""
        return self.plan(step).seq_len

    def step_metrics(self, step: int) -> dict:
        """The step's bucket k, row length 2^k, rows over all ranks and whether it runs
        sequence-parallel (for the monitor)."""
        p = self.plan(step)
        return {"data/bucket": p.bucket, "data/seq_len": p.seq_len, "data/batch_size": p.rows,
                "data/sp": p.sp}

    def _perm(self, k: int, epoch: int) -> np.ndarray:
        perm = self._perms.get((k, epoch))
        if perm is None:
            perm = np.random.default_rng([self.seed, k, epoch]).permutation(len(self._tokens[k]))
            if len(self._perms) >= 2 * len(self.ks):
                self._perms.pop(next(iter(self._perms)))
            self._perms[(k, epoch)] = perm
        return perm

    def global_chunks(self, step: int) -> np.ndarray:
        """Chunk indices (within the step's bucket) of all rows of `step`, in (rank, micro) order."""
        p = self.plan(step)
        return self._perm(p.bucket, p.epoch)[p.index * p.rows:(p.index + 1) * p.rows]

    def local_chunks(self, step: int, micro: int = 0) -> np.ndarray:
        """The chunk indices this rank loads at (`step`, `micro`)."""
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro={micro} must be in [0, {self.grad_accum})")
        p = self.plan(step)
        who = self.rank // self.sp if p.sp else self.rank
        first = (who * self.grad_accum + micro) * p.local_rows
        return self.global_chunks(step)[first:first + p.local_rows]

    def batch(self, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """input_ids, labels, position_ids: int64 [local_rows, 2^k] for this rank and micro-step."""
        return self.rows_of(self.plan(step).bucket, self.local_chunks(step, micro))

    def rows_of(self, k: int, chunks: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch made of the given chunks of bucket 2^k (one row each)."""
        return chunk_batch(self._tokens[k], self._next[k], k, chunks)


class TaggedBatch(dict):
    """A held-out batch that names its bucket (`tag`) and its `weight` in the evaluation's mean;
    kiln.infer.evaluate.batch_losses reads both (a plain dict has neither: weight 1, no tag)."""

    def __init__(self, batch: dict, tag: int, weight: float):
        super().__init__(batch)
        self.tag, self.weight = tag, weight


class TaggedBatches:
    """One evaluation's batches; batch_losses fills `per_tag` = {tag: [loss sum, batches]}."""

    def __init__(self, batches):
        self._batches = batches
        self.per_tag: dict[int, list[float]] = {}

    def __iter__(self):
        return iter(self._batches)


class DecomposeHeldOut:
    """Held-out batches of a decomposition stage: every bucket of the valid split, its own rows.

    eval_batches(n) yields up to n fixed batches per bucket, shortest bucket first, each the size
    of one training micro-step of that bucket (the same rows on every rank of a sequence-parallel
    group where the bucket runs sequence-parallel, else each rank its own), unshuffled; chunks
    wrap around only when a bucket holds fewer than one batch. Each batch of bucket k weighs
    T_k / (its batches), T_k = the bucket's held-out tokens, so the evaluation's weighted mean is
    the token-weighted mean over buckets: the loss over the whole held-out split, estimated per
    bucket. The last evaluation's batches are `last` (per-bucket sums for the decompose hook).
    """

    def __init__(self, prefixes: dict[int, str], tokens_per_step: int, rank: int, world: int, *,
                 sp: int = 1, sp_min_len: int = 0, grad_accum: int = 1):
        self.ks = sorted(prefixes)
        check_layout(tokens_per_step, (self.ks[0], self.ks[-1]), world, sp, sp_min_len, grad_accum)
        self.rank, self.world, self.sp, self.sp_min_len = rank, world, sp, sp_min_len
        self.rows = {k: (tokens_per_step >> k) // grad_accum for k in self.ks}  # one micro-step, all ranks
        self._data = {k: load_bucket(prefixes[k], k) for k in self.ks}
        self.chunks = {k: len(self._data[k][0]) for k in self.ks}
        self.last: TaggedBatches | None = None

    def eval_batch_count(self, n: int, k: int) -> int:
        """Batches of bucket k that eval_batches(n) yields (the same on every rank; 0 when empty)."""
        if not self.chunks[k]:
            return 0
        return max(0, min(n, max(1, self.chunks[k] // self.rows[k])))

    def eval_batches(self, n: int) -> TaggedBatches:
        """Up to n TaggedBatch per bucket (see the class docstring)."""
        self.last = TaggedBatches(self._batches(n))
        return self.last

    def _batches(self, n: int):
        for k in self.ks:
            count = self.eval_batch_count(n, k)
            on = uses_sp(1 << k, self.sp, self.sp_min_len)
            groups, who = (self.world // self.sp, self.rank // self.sp) if on else (self.world, self.rank)
            local = self.rows[k] // groups
            weight = (self.chunks[k] << k) / max(count, 1)
            tokens, nxt = self._data[k]
            for j in range(count):
                chunks = (j * self.rows[k] + who * local + np.arange(local)) % self.chunks[k]
                yield TaggedBatch(chunk_batch(tokens, nxt, k, chunks), k, weight)


def build_decompose_loader(cfg, decomposed, split: str, tokens_per_step: int, rank: int,
                           world: int, *, sp: int = 1, sp_min_len: int = 0, seed: int = 0,
                           grad_accum: int = 1, horizon: int = 0) -> DecomposeLoader:
    """A DecomposeLoader over `split` of a Decomposed folder, weighted by cfg's curriculum;
    `horizon` = the run's steps, so that a run shorter than the data gets the whole curriculum."""
    from .curriculum import bucket_weights

    prefixes = {k: decomposed.prefix(split, k) for k in decomposed.buckets}
    weights = bucket_weights(cfg.curriculum, len(prefixes), cfg.curriculum_weights)
    return DecomposeLoader(prefixes, tokens_per_step, rank, world, sp=sp, sp_min_len=sp_min_len,
                           seed=seed, grad_accum=grad_accum, weights=weights,
                           num_cycles=cfg.num_cycles, horizon=horizon)



def build_decompose_heldout(decomposed, tokens_per_step: int, rank: int, world: int, *, sp: int = 1,
                            sp_min_len: int = 0, grad_accum: int = 1) -> DecomposeHeldOut:
    """The held-out batches of every bucket of a Decomposed folder's valid split."""
    prefixes = {k: decomposed.prefix("valid", k) for k in decomposed.buckets}
    return DecomposeHeldOut(prefixes, tokens_per_step, rank, world, sp=sp, sp_min_len=sp_min_len,
                            grad_accum=grad_accum)
