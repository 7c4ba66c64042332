"""Causal language modelling: next-token prediction."""
from torch import nn

from kiln.trainer.objectives.base import Objective


class CausalLM(Objective):
    """Mean cross-entropy over labels != -100 (+ the MoE blocks' router losses while training)."""

    def __init__(self, model: nn.Module, z_loss: float = 0.0, loss_group=None, seed: int = 0, rank: int = 0):
        super().__init__(model, loss_group=loss_group, seed=seed, rank=rank)
        self.z_loss = z_loss

    @classmethod
    def build(cls, model, cfg, *, loss_group=None, seed: int = 0, rank: int = 0, mask_id=None) -> "CausalLM":
        return cls(model, z_loss=cfg.z_loss, loss_group=loss_group, seed=seed, rank=rank)

    def loss(self, input_ids, labels, position_ids=None, doc_ids=None):
        hidden = self.model(input_ids, position_ids=position_ids, doc_ids=doc_ids)
        loss = self.model.head(hidden, labels=labels, z_loss=self.z_loss)
        return self.scale_and_regularise(loss, labels), {}
