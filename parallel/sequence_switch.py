"""Sequence parallelism that can be switched off step by step (variable-length batches).

With dataset decomposition, long buckets run ring attention over the sequence group (every rank
of the group holds a zigzag shard of the same rows) while short buckets run data-parallel (each
rank its own whole rows, plain local attention). `SequenceSwitch(model)` wraps every attention
module's current `attn_fn` (the ring one, set by apply_sequence_parallel) with a dispatcher;
`switch.on` picks ring or local attention for the next forward. The choice made in the forward
is what autograd replays in the backward, so flipping it between steps is safe.

Every rank of a sequence group must set the same value for a step (the ring would otherwise
wait for a partner that computes locally): callers derive it from the step's sequence length.

Gradients stay right in both modes: DeepSpeed averages gradients over all ranks, and the loss
of each rank is its token share of the step's global mean (kiln.parallel.sequence.token_share
over the group that normalises the loss), whichever way the tokens were split over ranks.
"""
from kiln import kernels


class SequenceSwitch:
    """Ring attention while `on`, local attention otherwise, for every attention module."""

    def __init__(self, model, local_fn=None):
        self.on = True
        local_fn = local_fn or kernels.attention
        count = 0
        for module in model.modules():
            if hasattr(module, "attn_fn"):
                module.attn_fn = self._dispatch(module.attn_fn, local_fn)
                count += 1
        if count == 0:
            raise ValueError("SequenceSwitch found no module with an `attn_fn` to wrap")

    def _dispatch(self, ring_fn, local_fn):
        def attn_fn(q, k, v, **kwargs):
            return (ring_fn if self.on else local_fn)(q, k, v, **kwargs)

        return attn_fn
