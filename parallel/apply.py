"""Parallelism applied to a built model from outside it, as torchtitan's parallelize functions do.

The model (kiln.model) has no parallel code; `parallelize` swaps the seams it exposes: every
attention module's `attn_fn` (sequence parallelism) and every MoE block's `expert_compute` with
its experts moved into a per-rank bank (expert parallelism). Data parallelism and ZeRO are the
DeepSpeed engine's. Every rank calls it in the same order (group creation is collective).
"""
from kiln.parallel.sequence import SequenceLayout


def parallelize(model, mesh, cfg, *, placement=None, ring_for=None):
    """Apply `cfg` (the recipe's parallel section) to `model` over `mesh`'s groups.

    placement: the [L, E] expert placement to start from (None = contiguous); ring_for: see
    SequenceLayout. Returns the SequenceLayout batches go through, or None without sequence
    parallelism."""
    layout = None
    if mesh.sp > 1:
        layout = SequenceLayout(model, mesh.sp_group, cfg.sp_impl, ring_for)
    if mesh.ep > 1:
        from kiln.parallel.expert import apply_expert_parallel
        from kiln.parallel.expert_deepspeed import mark_expert_params

        apply_expert_parallel(model, mesh.ep_group, placement)
        mark_expert_params(model, mesh.ep)
    return layout
