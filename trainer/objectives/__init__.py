"""Objectives, one file each, sharing the protocol of base.py. The recipe's objective.name picks one."""
from kiln.trainer.objectives.base import Objective
from kiln.trainer.objectives.clm import CausalLM

OBJECTIVES = {"clm": CausalLM}


def build_objective(name: str, model, cfg, *, loss_group=None, seed: int = 0, rank: int = 0) -> Objective:
    """The objective named by the recipe, wrapping `model`."""
    return OBJECTIVES[name].build(model, cfg, loss_group=loss_group, seed=seed, rank=rank)


__all__ = ["OBJECTIVES", "CausalLM", "Objective", "build_objective"]
