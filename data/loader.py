"""Concat-and-chunk batches with document masks, deterministic from (seed, step).

All documents (each ending with EOT) are conceptually concatenated into one token stream;
sample i is the window of seq_len + 1 tokens starting at token i * seq_len. Inputs are the
first seq_len tokens, labels the next token at each position, except that a label whose token
belongs to another document than its input is -100: the model never predicts across a
document boundary. position_ids restart at 0 at the window start and at every document start;
doc_ids number the documents of a row 0, 1, 2, ... (for block-diagonal attention masks).

Sample order: epoch e is a permutation of all samples seeded by (seed, e); the global stream
is epoch 0's order, then epoch 1's, ... Step s takes the next global batch
(micro_batch * grad_accum * dp_size entries) of that stream; rank r, micro-step m take the
disjoint slice starting at ((r * grad_accum + m) * micro_batch). Nothing depends on history,
so a run resumed at step k sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations  # torch.Tensor in annotations: torch loads with the first batch

from typing import TYPE_CHECKING

import numpy as np

from .config import DataConfig
from .errors import DataError
from .indexed import open_indexed

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


class ChunkLoader:
    """Batches of fixed-length windows over one indexed dataset (see the module docstring); a
    BatchSource."""

    # Each rank's loss is the mean over its own labels and the ranks' losses are averaged: the
    # loss the training curves were recorded with.
    global_token_mean = False

    def __init__(self, prefix: str, seq_len: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int, grad_accum: int = 1):
        if seq_len < 1 or micro_batch < 1 or grad_accum < 1 or dp_size < 1:
            raise ValueError(f"seq_len={seq_len}, micro_batch={micro_batch}, grad_accum={grad_accum}"
                             f" and dp_size={dp_size} must all be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.prefix, self.seq_len, self.micro_batch = str(prefix), seq_len, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.grad_accum = dp_rank, dp_size, seed, grad_accum
        self._tokens, self._doc_starts, self._doc_ends = open_indexed(prefix)
        self.total_tokens = int(self._doc_ends[-1]) if len(self._doc_ends) else 0
        self._num_samples = (self.total_tokens - 1) // seq_len
        if self._num_samples < 1:
            raise DataError(f"{prefix} holds {self.total_tokens} tokens, too few for one sample of "
                            f"seq_len+1={seq_len + 1}: lower data.seq_len or add documents")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        """Windows per epoch: (total tokens - 1) // seq_len (the last partial window is dropped)."""
        return self._num_samples

    @property
    def global_batch(self) -> int:
        """Samples per optimiser step over all ranks and micro-steps."""
        return self.micro_batch * self.grad_accum * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimiser step over all ranks and micro-steps."""
        return self.global_batch * self.seq_len

    def row_len(self, step: int) -> int:
        """seq_len: every step is made of windows of the same length."""
        return self.seq_len

    def step_metrics(self, step: int) -> dict:
        """Nothing: every step has the same shape."""
        return {}

    def epoch_of(self, step: int) -> int:
        """The epoch the first sample of `step` belongs to."""
        return step * self.global_batch // self._num_samples

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            # SeedSequence([seed, epoch]): independent, reproducible permutation per epoch.
            perm = np.random.default_rng([self.seed, epoch]).permutation(self._num_samples)
            if len(self._perms) >= 2:  # a step spans at most two epochs (unless data is tiny)
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample indices at positions of the global (multi-epoch) sample stream."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self._num_samples)
        out = np.empty_like(positions)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[offsets[sel]]
        return out

    def global_samples(self, step: int) -> np.ndarray:
        """All sample indices of `step`, in (rank, micro-step, row) order."""
        return self.samples_at(step * self.global_batch + np.arange(self.global_batch))

    def local_samples(self, step: int, micro: int = 0) -> np.ndarray:
        """The sample indices this rank uses at (`step`, `micro`)."""
        if step < 0 or not 0 <= micro < self.grad_accum:
            raise ValueError(f"step={step} must be >= 0 and micro={micro} in [0, {self.grad_accum})")
        first = step * self.global_batch + (self.dp_rank * self.grad_accum + micro) * self.micro_batch
        return self.samples_at(first + np.arange(self.micro_batch))

    def batch(self, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """input_ids, labels, position_ids, doc_ids: int64 tensors of shape [micro_batch, seq_len]."""
        return self.windows(self.local_samples(step, micro))

    def eval_batch_count(self, n: int) -> int:
        """How many batches eval_batches(n) yields (the same on every rank)."""
        per_batch = self.micro_batch * self.dp_size
        return max(0, min(n, max(1, self._num_samples // per_batch)))

    def eval_batches(self, n: int):
        """Yield up to n fixed batches for evaluation, unshuffled, each rank its own shard.

        Batch j of rank r holds samples (j * dp_size + r) * micro_batch + [0, micro_batch).
        Only when the split has fewer samples than one batch per rank do samples wrap around.
        """
        for j in range(self.eval_batch_count(n)):
            first = (j * self.dp_size + self.dp_rank) * self.micro_batch
            yield self.windows((first + np.arange(self.micro_batch)) % self._num_samples)

    def windows(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch made of the given sample indices (one row each)."""
        import torch
        L = self.seq_len
        starts = np.asarray(samples, dtype=np.int64) * L
        tokens = np.stack([self._tokens[s:s + L + 1] for s in starts])  # sequences are back to back
        pos = starts[:, None] + np.arange(L + 1)
        doc = np.searchsorted(self._doc_ends, pos, side="right")  # document of every token
        first = np.maximum(self._doc_starts[doc[:, :L]], starts[:, None])
        labels = tokens[:, 1:].astype(np.int64)
        labels[doc[:, 1:] != doc[:, :L]] = IGNORE_INDEX
        out = {"input_ids": tokens[:, :L].astype(np.int64), "labels": labels,
               "position_ids": pos[:, :L] - first, "doc_ids": doc[:, :L] - doc[:, :1]}
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


PACKINGS = {"concat": ChunkLoader}  # data.packing -> loader class over one indexed dataset


def build_loader(cfg: DataConfig, prefix: str, *, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int, grad_accum: int = 1) -> ChunkLoader:
    """The loader `cfg.packing` names, over the indexed dataset at `prefix`."""
    if cfg.packing == "decompose":  # one dataset per bucket, not one prefix
        raise ValueError("data.packing=decompose reads per-bucket datasets: use "
                         "kiln.data.decompose_loader.build_decompose_loader")
    cls = PACKINGS.get(cfg.packing)
    if cls is None:
        raise ValueError(f"data.packing={cfg.packing!r} has no loader: choose one of {list(PACKINGS)}")
    return cls(prefix, cfg.seq_len, micro_batch, dp_rank, dp_size, seed, grad_accum)
