"""The objective protocol: what turns a batch and the model into a loss.

An objective is one nn.Module that owns the model(s) and heads it trains, so that the DeepSpeed
engine sees a single forward (ZeRO-3 gathers parameters module by module inside it):
  * `build(model, cfg, ..., mask_id)` (classmethod): wrap the built, parallelised model; build any extra
    model or head the objective needs (ELECTRA's generator, say);
  * `prepare_batch(batch, step)`: runs on the whole CPU batch, before sequence-parallel sharding,
    so that every layout sees the same inputs; its random choices come from `generator(step)`,
    seeded by (seed, step, rank), so a resumed run redraws exactly what it drew before. The stage
    sets `rank` per batch to the owner of its rows (Stage.rows_owner): the data-parallel rank
    where sequence ranks share the rows, so they draw the same masks for them;
  * `loss(**batch) -> (loss, metrics)`: the scalar the engine backpropagates and a dict of floats
    or scalar tensors for the log (averaged over the window);
  * `flops_per_token(seq_len)`: training FLOPs per token, for MFU.
`forward(**batch)` returns the loss alone (what the engine needs) and keeps the metrics.
"""
import abc

import numpy as np
import torch
from torch import nn

from kiln.model import flops_per_token
from kiln.model.moe import moe_aux_loss
from kiln.parallel.sequence import token_share


class Objective(nn.Module, metaclass=abc.ABCMeta):
    """Base of every objective (see the module docstring)."""

    def __init__(self, model: nn.Module, *, loss_group=None, seed: int = 0, rank: int = 0):
        super().__init__()
        self.model = model
        self.loss_group = loss_group  # ranks over which the loss is one mean (see token_share)
        self.seed, self.rank = seed, rank
        self.last_metrics: dict = {}

    @classmethod
    def build(cls, model: nn.Module, cfg, *, loss_group=None, seed: int = 0, rank: int = 0,
              mask_id: int | None = None) -> "Objective":
        """The objective for `model` with its recipe section `cfg` (objective.*); `mask_id` is the
        tokenizer's MASK token, for the objectives that mask inputs."""
        return cls(model, loss_group=loss_group, seed=seed, rank=rank)

    def generator(self, step: int) -> torch.Generator:
        """A CPU generator seeded by (seed, step, rank): the randomness of prepare_batch."""
        state = np.random.SeedSequence([self.seed, step, self.rank]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))

    def prepare_batch(self, batch: dict, step: int) -> dict:
        """The batch this objective trains on at `step` (default: unchanged)."""
        return batch

    @abc.abstractmethod
    def loss(self, **batch):
        """(loss, metrics) of one micro-batch."""

    def forward(self, *args, **batch):
        loss, self.last_metrics = self.loss(*args, **batch)
        return loss

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the trained model at this row length."""
        return flops_per_token(self.model.cfg, seq_len)

    def scale_and_regularise(self, loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's share of the mean over `loss_group`, plus the MoE router losses while
        training (evaluation reports the objective's loss alone)."""
        if self.loss_group is not None:
            loss = loss * token_share(labels, self.loss_group).to(loss.dtype)
        if self.training:
            aux = moe_aux_loss(self.model)
            if aux is not None:
                loss = loss + aux.to(loss.dtype)
        return loss
