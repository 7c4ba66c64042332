"""Objectives: a batch + the model -> a loss. Each is a module wrapping the model, so that the
DeepSpeed engine sees one forward (ZeRO-3 gathers parameters module by module inside it).

New objectives (MEAP, ELECTRA) register in OBJECTIVES with the same call shape.
"""
import torch
from torch import nn


class CausalLM(nn.Module):
    """Next-token prediction: mean cross-entropy over labels != -100."""

    def __init__(self, model: nn.Module, z_loss: float = 0.0):
        super().__init__()
        self.model = model
        self.z_loss = z_loss

    def forward(self, input_ids, labels, position_ids=None, doc_ids=None):
        hidden = self.model(input_ids, position_ids=position_ids, doc_ids=doc_ids)
        return self.model.head(hidden, labels=labels, z_loss=self.z_loss)


OBJECTIVES = {"clm": CausalLM}


def build_objective(name: str, model: nn.Module, cfg) -> nn.Module:
    """Wrap `model` in the objective named by the recipe."""
    return OBJECTIVES[name](model, z_loss=cfg.z_loss)


@torch.no_grad()
def evaluate(objective: nn.Module, batches) -> float:
    """Mean loss of `objective` over an iterable of batches (dicts)."""
    was = objective.training
    objective.eval()
    losses = [float(objective(**b)) for b in batches]
    objective.train(was)
    return sum(losses) / max(len(losses), 1)
