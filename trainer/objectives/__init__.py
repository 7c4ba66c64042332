"""Objectives, one file each, sharing the protocol of base.py. The recipe's objective.name picks one.

The classes load on first use (`from kiln.trainer.objectives import MEAP` works as ever): kiln's
config imports objectives.config, and reading a recipe must not import torch."""
import importlib

# objective.name -> "module:class"; a new objective adds its file, its entry here and its name to
# ObjectiveConfig.name's choices
_CLASSES = {"clm": "clm:CausalLM", "meap": "meap:MEAP", "mlm": "mlm:MLM", "electra": "electra:Electra"}
_NAMES = {path.split(":")[1]: path for path in (*_CLASSES.values(), "base:Objective")}


def _load(path: str):
    module, cls = path.split(":")
    return getattr(importlib.import_module(f"kiln.trainer.objectives.{module}"), cls)


def __getattr__(name: str):
    if name == "OBJECTIVES":
        return {key: _load(path) for key, path in _CLASSES.items()}
    if name in _NAMES:
        return _load(_NAMES[name])
    raise AttributeError(f"module 'kiln.trainer.objectives' has no attribute {name!r}")


def build_objective(name: str, model, cfg, *, loss_group=None, seed: int = 0, rank: int = 0,
                    mask_id: int | None = None):
    """The objective named by the recipe, wrapping `model`."""
    return _load(_CLASSES[name]).build(model, cfg, loss_group=loss_group, seed=seed, rank=rank, mask_id=mask_id)


__all__ = ["MEAP", "MLM", "OBJECTIVES", "CausalLM", "Electra", "Objective", "build_objective"]
