"""Run a model's MoE layers from an ExpertCache: the `expert_compute` seam of kiln.model.moe,
replaced per block. The arithmetic is the local path's, expert group by expert group, so outputs
equal the un-offloaded model's bitwise on CPU (a group's GEMM does not depend on the others).

Per layer and forward: the experts its tokens chose that are resident run first, in one grouped
GEMM, while a loader thread brings in the missing ones ("real-time correction"); each missing
expert runs as soon as its copy lands. A slot is only reused once its expert has run.
"""
import threading

import torch

from kiln import kernels
from kiln.infer.expertflow.cache import ExpertCache
from kiln.infer.expertflow.store import moe_blocks
from kiln.model.moe import SwiGLUExperts


def _run_experts(tensors: dict, rows: torch.Tensor, sizes: list, slots: list) -> torch.Tensor:
    """SwiGLUExperts' arithmetic on slot tensors: swiglu(x W1_s, x W3_s) W2_s per group."""
    h = kernels.swiglu(kernels.grouped_linear(rows, tensors["w1"], sizes, slots),
                       kernels.grouped_linear(rows, tensors["w3"], sizes, slots))
    return kernels.grouped_linear(h, tensors["w2"], sizes, slots)


class OffloadedCompute:
    """The expert_compute of MoE layer `layer`, served from `cache`."""

    def __init__(self, cache: ExpertCache, layer: int):
        self.cache, self.layer = cache, layer

    def __call__(self, block, x, expert_idx, weights):
        cache, layer, e = self.cache, self.layer, block.num_experts
        x_perm, counts, row_map = kernels.moe_permute(x, expert_idx, e + 1)
        cache.ready[layer].wait()  # this layer's prefetch, if one is running, has landed
        sizes = [int(c) for c in counts[:e].tolist()]
        kept = sum(sizes)
        starts = [sum(sizes[:i]) for i in range(e)]
        needed = [i for i in range(e) if sizes[i]]
        resident = cache.resident(layer)
        hits = [i for i in needed if i in resident]
        missing = [i for i in needed if i not in resident]
        st = cache.stats
        st.forwards += 1
        st.activated += len(needed)
        st.per_forward.append(len(needed))
        cache.trace[layer].append(set(needed))
        st.hits += len(hits)
        st.misses += len(missing)
        cache.mark_used(layer, needed)

        y = x_perm.new_empty(kept, block.experts.w2.shape[1])
        done, ready, cond = set(), set(), threading.Condition()

        def pending() -> set:
            return set(needed) - done

        def loader():
            for m in missing:
                with cond:  # wait for a slot that no pending expert holds
                    cond.wait_for(lambda: len(cache.lru[layer]) < cache.slots
                                  or any(r not in pending() for r in cache.lru[layer]))
                    keep = pending()
                cache.load(layer, m, keep)
                cache.sync()
                with cond:
                    ready.add(m)
                    cond.notify_all()

        thread = threading.Thread(target=loader, daemon=True) if missing else None
        if thread is not None:
            thread.start()
        groups = [hits] + [[m] for m in missing]
        for group in groups:
            if not group:
                continue
            if group[0] in missing:
                with cond:
                    cond.wait_for(lambda: group[0] in ready)
            slots = [cache.slot(layer, i) for i in group]
            rows = torch.cat([x_perm[starts[i]:starts[i] + sizes[i]] for i in group])
            out = _run_experts(cache.tensors[layer], rows, [sizes[i] for i in group], slots)
            at = 0
            for i in group:
                y[starts[i]:starts[i] + sizes[i]] = out[at:at + sizes[i]]
                at += sizes[i]
            with cond:
                done.update(group)
                cond.notify_all()
        if thread is not None:
            thread.join()
        if kept < x_perm.shape[0]:  # capacity-dropped choices (the sentinel bucket) give zeros
            y = torch.cat([y, y.new_zeros(x_perm.shape[0] - kept, y.shape[1])])
        return kernels.moe_unpermute(y, row_map, weights)


def offload(model, cache: ExpertCache) -> None:
    """Serve `model`'s routed experts from `cache`: each MoE block's expert_compute reads the
    fast-tier slots, and its own expert bank is dropped to the meta device (no memory)."""
    blocks = moe_blocks(model)
    if len(blocks) != cache.store.layers:
        raise ValueError(f"the expert store holds {cache.store.layers} MoE layers, the model {len(blocks)}")
    for j, block in enumerate(blocks):
        block.expert_compute = OffloadedCompute(cache, j)
        w1 = block.experts.w1
        block.experts = SwiGLUExperts(w1.shape[0], w1.shape[2], w1.shape[1], seed=0, deferred=True)


def fast_tier_bytes(model, cache: ExpertCache | None) -> int:
    """Bytes of the model's materialised parameters plus the cache's slots."""
    own = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    return own + (cache.fast_bytes if cache is not None else 0)

