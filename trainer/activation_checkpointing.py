"""Activation checkpointing (`train.activation_checkpointing: none|full|selective`), applied from
outside the model through torch.utils.checkpoint, as parallelism is (Stage.build calls it).

  full:      each transformer block keeps only its input; its whole forward (attention, MLP,
             MoE dispatch included) runs again in the backward.
  selective: the block's cheap projections keep their activations; the attention core (the
             `attn_fn` seam: local, TokenRing, Ring or Ulysses attention) and the MLP's inner
             activations (SwiGLU's w1/w3 outputs; for MoE the experts' own SwiGLU, not the router
             or the all-to-alls) are recomputed.

Recomputation must be exact and collective-safe: torch's non-reentrant checkpoint restores the
RNG state and replays the same ops, `early_stop=False` makes every rank replay the whole region
(a ring or all-to-all inside it then runs to the end on every rank, in the same order, as the
autograd engine walks the same graph on each), and the replayed forward's messages are counted
under the backward pass by kiln.parallel.comm.COMM_STATS.recomputing(), since that is when they
are sent.
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint

from kiln.model.moe import SwiGLUExperts
from kiln.model.transformer import Block, SwiGLU
from kiln.parallel.comm import COMM_STATS

MODES = ("none", "full", "selective")


def checkpointed(fn):
    """`fn` wrapped so that, when it runs with gradients, its activations are recomputed in the
    backward instead of kept (and its replay's traffic counts as backward-pass traffic)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing would be saved anyway
            return fn(*args, **kwargs)
        calls = []

        def body(*a, **k):
            if calls:  # the second call is the recomputation, inside the backward pass
                with COMM_STATS.recomputing():
                    return fn(*a, **k)
            calls.append(1)
            return fn(*a, **k)

        return checkpoint(body, *args, use_reentrant=False, early_stop=False, **kwargs)

    return run


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> int:
    """Wrap `model`'s blocks for `mode` (see the module doc); returns how many callables were
    wrapped. Call it after parallelize (so the seams it wraps are the parallel ones)."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r}: use one of {list(MODES)}")
    if mode == "none":
        return 0
    count = 0
    for module in model.modules():
        if mode == "full" and isinstance(module, Block):
            module.forward = checkpointed(module.forward)
            count += 1
        elif mode == "selective":
            if hasattr(module, "attn_fn"):
                module.attn_fn = checkpointed(module.attn_fn)
                count += 1
            if isinstance(module, (SwiGLU, SwiGLUExperts)):
                module.forward = checkpointed(module.forward)
                count += 1
    if count == 0:
        raise ValueError(f"activation_checkpointing={mode} found nothing to wrap in {type(model).__name__}")
    return count
