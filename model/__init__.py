"""The model alone: Transformer, the MoE block, their configs, FLOP and parameter counts.

Imports only kiln.kernels. Parallelism (kiln.parallel), growth (kiln.growth) and the trainer act
on it from outside, through small protocols (the attention module's `attn_fn`, the MoE block's
router / experts / expert_compute).
"""
from kiln.model.config import ModelConfig, MoEConfig
from kiln.model.flops import (attention_flops, causal_pairs, count_params, flops_per_token, matmul_params,
                              param_count)

# The modules are torch's; the configs and counts are not. They are imported on first use, so that
# the `kiln` CLI reads a recipe (and reports its mistakes) without paying for importing torch.
_LAZY = {"MoE": "kiln.model.moe", "moe_aux_loss": "kiln.model.moe", "Transformer": "kiln.model.transformer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.model' has no attribute {name!r}")


__all__ = ["ModelConfig", "MoEConfig", "MoE", "Transformer", "attention_flops", "causal_pairs",
           "count_params", "flops_per_token", "matmul_params", "moe_aux_loss", "param_count"]
