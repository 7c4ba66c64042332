"""Telling DeepSpeed which parameters are expert parameters, with DeepSpeed's own MoE machinery.

Expert gradients must be averaged only over the ranks holding the same experts (the expert-data-
parallel group), not over all ranks. DeepSpeed implements exactly that for its MoE layers, on
CPU/gloo as well as on GPUs (checked in tests/parallel/test_expert.py for ZeRO 0, 1 and 2):
  * a parameter with `allreduce = False` and `group_name = "ep_size_<R>"` is an expert parameter;
  * the engine switches its MoE path on when the model contains a `deepspeed.moe.layer.MoE`
    module; kiln's experts are not DeepSpeed modules, so a parameter-less marker subclass is
    attached to the model (`model.deepspeed_moe_marker`) whose only job is that switch;
  * the optimizer's param groups are split with DeepSpeed's
    `split_params_into_different_moe_groups_for_optimizer`, so ZeRO-1/2 partition expert state
    over the expert-data-parallel group;
  * the groups are DeepSpeed's (`ep_size_<R>`): expert-parallel = R consecutive ranks,
    expert-data-parallel = ranks with equal rank % R. kiln's all-to-all uses the same groups.
DeepSpeed averages expert gradients with the full data-parallel size (sum over the group / world),
which is what makes EP=R equal EP=1. ZeRO-3 is not supported by DeepSpeed's native MoE path.
Its checkpoint path for native MoE saves no per-expert files for this marker
(num_local_experts = 0) and its model file holds only rank 0's bank rows; kiln saves every rank's
experts itself, keyed by (layer, expert) (expert_state.save_experts / ExpertCheckpoint).
"""
import torch.nn as nn
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups


def group_name(ep: int) -> str:
    """DeepSpeed's name for the expert groups of size `ep`."""
    return f"ep_size_{ep}"


def expert_groups(ep: int):
    """(expert-parallel group, expert-data-parallel group) of this rank, created once through
    DeepSpeed (deepspeed.comm must be initialised: deepspeed.init_distributed)."""
    name = group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


class DeepSpeedMoEMarker(_DeepSpeedMoE):
    """Parameter-less stand-in that makes the DeepSpeed engine take its MoE path."""

    def __init__(self, ep: int, num_experts: int):
        nn.Module.__init__(self)  # skip DeepSpeed's layer construction: nothing to compute
        self.ep_size, self.num_experts, self.num_local_experts = ep, num_experts, 0
        self.expert_group_name = group_name(ep)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        expert_groups(self.ep_size)

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")


def mark_expert_params(model: nn.Module, ep: int) -> int:
    """Flag the expert parameters (`p.kiln_expert`) for DeepSpeed and attach the marker.
    Call before deepspeed.initialize; returns the number of expert parameters flagged."""
    n = 0
    for p in model.parameters():
        if getattr(p, "kiln_expert", False):
            p.allreduce, p.group_name = False, group_name(ep)
            n += 1
    if n:
        num = model.kiln_ep.layout.experts if hasattr(model, "kiln_ep") else 0
        model.add_module("deepspeed_moe_marker", DeepSpeedMoEMarker(ep, num))
    return n


def expert_param_groups(param_groups: list) -> list:
    """Split optimizer param groups so expert parameters form their own (`moe: True`) groups."""
    named = [{"name": g.get("name", f"group{i}"), **g} for i, g in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)
