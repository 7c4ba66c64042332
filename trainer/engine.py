"""The DeepSpeed engine: config generated from the recipe, optimizer and LR schedule kiln's own."""
import deepspeed
import torch

from kiln.trainer.config import merge
from kiln.trainer.optim import lr_lambda, param_groups


def deepspeed_config(recipe, bf16: bool) -> dict:
    """The DeepSpeed JSON config for this recipe; `recipe.deepspeed` overrides any key."""
    cfg = {
        "train_micro_batch_size_per_gpu": recipe.train.micro_batch,
        "gradient_accumulation_steps": recipe.train.grad_accum,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": {"stage": recipe.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return merge(cfg, recipe.deepspeed)


def build_engine(objective: torch.nn.Module, recipe, bf16: bool, steps: int | None = None,
                 warmup: int | None = None):
    """Wrap the objective module, AdamW and the schedule in a DeepSpeed engine. The schedule spans
    `steps` with `warmup` (default train.steps and schedule.warmup_steps; a stage has its own)."""
    o = recipe.optim
    groups = param_groups(objective, o.weight_decay)
    if recipe.parallel.ep > 1:  # expert params in their own groups: DeepSpeed reduces them per expert group
        from kiln.parallel.expert_deepspeed import expert_param_groups

        groups = expert_param_groups(groups)
    # fused=True: one multi-tensor kernel per step instead of ~10 elementwise ops per parameter
    # (torch has it for CPU and CUDA); the update is the same AdamW arithmetic
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    s = recipe.schedule
    steps = recipe.train.steps if steps is None else steps
    warmup = s.warmup_steps if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_lambda(step, warmup, steps, s.decay, o.min_lr_ratio, s.decay_fraction))
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(recipe, bf16))
    if recipe.parallel.zero_stage == 0 and torch.distributed.get_world_size() == 1:
        # One rank has nothing to reduce, but DeepSpeed's stage-0 path would still flatten every
        # gradient into a bucket, all-reduce it with itself and copy it back (~7% of a small step)
        engine.enable_backward_allreduce = False
    if recipe.parallel.zero_stage == 3:
        # A tied head uses the embedding's weight outside the embedding's forward; ZeRO-3 must
        # know to gather it around the head's forward too.
        for module in engine.module.modules():
            if getattr(module, "_tied", None):
                deepspeed.zero.register_external_parameter(module, module.matrix)
    return engine


def grad_norm(engine, ep_group=None) -> float | None:
    """Global L2 norm of the (already averaged) gradients, before clipping; None under ZeRO-2/3
    where the gradients are partitioned and the ZeRO optimizer reports the norm itself.
    Expert-parallel shards are summed over `ep_group` (kiln.parallel.expert.grad_norm)."""
    from kiln.parallel.expert import grad_norm as parallel_grad_norm

    if engine.zero_optimization_stage() >= 2:
        return None
    return parallel_grad_norm(engine.module.parameters(), ep_group)
