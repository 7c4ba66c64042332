"""Objectives: a batch + the model -> a loss. Each is a module wrapping the model, so that the
DeepSpeed engine sees one forward (ZeRO-3 gathers parameters module by module inside it).

New objectives (MEAP, ELECTRA) register in OBJECTIVES with the same call shape.
"""
from torch import nn

from kiln.parallel.sequence import token_share
from kiln.model.moe import moe_aux_loss


class CausalLM(nn.Module):
    """Next-token prediction: mean cross-entropy over labels != -100 (+ the MoE blocks' router
    losses while training; evaluation reports the cross-entropy alone)."""

    def __init__(self, model: nn.Module, z_loss: float = 0.0, sp_group=None):
        super().__init__()
        self.model = model
        self.z_loss = z_loss
        self.sp_group = sp_group  # set when the sequence is split over ranks

    def forward(self, input_ids, labels, position_ids=None, doc_ids=None):
        hidden = self.model(input_ids, position_ids=position_ids, doc_ids=doc_ids)
        loss = self.model.head(hidden, labels=labels, z_loss=self.z_loss)
        if self.sp_group is not None:
            loss = loss * token_share(labels, self.sp_group).to(loss.dtype)
        if self.training:
            aux = moe_aux_loss(self.model)
            if aux is not None:
                loss = loss + aux.to(loss.dtype)
        return loss


OBJECTIVES = {"clm": CausalLM}


def build_objective(name: str, model: nn.Module, cfg, sp_group=None) -> nn.Module:
    """Wrap `model` in the objective named by the recipe."""
    return OBJECTIVES[name](model, z_loss=cfg.z_loss, sp_group=sp_group)
