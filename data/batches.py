"""BatchSource: what the training loop asks of a packing, so that it never asks which one runs.

Two loaders implement it: kiln.data.loader.ChunkLoader (concat-and-chunk, data.packing=concat)
and kiln.data.decompose_loader.DecomposeLoader (dataset decomposition, data.packing=decompose).
"""

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # the annotation only: importing this module must not import torch
    from torch import Tensor


@runtime_checkable
class BatchSource(Protocol):
    """The batches of a run, a pure function of (seed, step): a resumed run sees the same ones.

    tokens_per_step: input tokens of one optimizer step over all ranks and micro-steps, each
        row counted once (the ranks of a sequence-parallel group share their rows).
    global_token_mean: how the loss of a step is normalised. False: each rank takes the mean
        over its own labels and the ranks' losses are averaged. True: the step's loss is the
        mean over every label of the step on all ranks, because ranks hold different numbers
        of valid labels; each rank scales its loss by its token share over the world group.
    """

    tokens_per_step: int
    global_token_mean: bool

    def batch(self, step: int, micro: int = 0) -> "dict[str, Tensor]":
        """This rank's rows of (step, micro-step): int64 CPU tensors [rows, row_len(step)] with
        input_ids, labels (-100 = no label), position_ids and, where rows hold several
        documents, doc_ids; not yet sharded for sequence parallelism."""
        ...

    def row_len(self, step: int) -> int:
        """The row length (tokens) of every row of `step`."""
        ...

    def step_metrics(self, step: int) -> dict:
        """Per-step data metrics for the monitor ("data/..." keys); {} when steps do not differ."""
        ...
