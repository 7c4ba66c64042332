"""Objectives, one file each, sharing the protocol of base.py. The recipe's objective.name picks one."""
from kiln.trainer.objectives.base import Objective
from kiln.trainer.objectives.clm import CausalLM
from kiln.trainer.objectives.electra import Electra
from kiln.trainer.objectives.meap import MEAP
from kiln.trainer.objectives.mlm import MLM

# objective.name -> class; a new objective adds its file, its entry here and its name to
# ObjectiveConfig.name's choices
OBJECTIVES = {"clm": CausalLM, "meap": MEAP, "mlm": MLM, "electra": Electra}


def build_objective(name: str, model, cfg, *, loss_group=None, seed: int = 0, rank: int = 0,
                    mask_id: int | None = None) -> Objective:
    """The objective named by the recipe, wrapping `model`."""
    return OBJECTIVES[name].build(model, cfg, loss_group=loss_group, seed=seed, rank=rank, mask_id=mask_id)


__all__ = ["MEAP", "MLM", "OBJECTIVES", "CausalLM", "Electra", "Objective", "build_objective"]
