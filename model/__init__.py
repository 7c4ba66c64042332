"""The model alone: Transformer, the MoE block, their configs, FLOP and parameter counts.

Imports only kiln.kernels. Parallelism (kiln.parallel), growth (kiln.growth) and the trainer act
on it from outside, through small protocols (the attention module's `attn_fn`, the MoE block's
router / experts / expert_compute).
"""
from kiln.model.config import ModelConfig, MoEConfig
from kiln.model.flops import (attention_flops, causal_pairs, count_params, flops_per_token, matmul_params,
                              param_count)
from kiln.model.moe import MoE, moe_aux_loss
from kiln.model.transformer import Transformer

__all__ = ["ModelConfig", "MoEConfig", "MoE", "Transformer", "attention_flops", "causal_pairs",
           "count_params", "flops_per_token", "matmul_params", "moe_aux_loss", "param_count"]
