"""Expert parallelism: shard MoE experts over an expert-parallel group under any placement.

A *placement* is an int array [L, E]: the expert-parallel rank holding expert e of MoE layer l
(layers counted over MoE blocks only). Memory balance is over the whole model: every rank holds
exactly S = L*E/R experts, while per-layer counts may differ (kiln.parallel.placement).

Each rank stores its S experts in one `ExpertBank` (stacked [S, ...] SwiGLU weights; slot i holds
the rank's i-th (layer, expert) in (l, e) order). The bank's shape never depends on the placement,
so a placement change is a permutation of bank rows between ranks (see expert_migrate): DeepSpeed's
flat buffers and optimizer state keep their shapes.

Dispatch of one MoE layer (all sizes exchanged, so any placement works):
  1. relabel each choice's expert by its *dispatch position* (experts sorted by (rank, e)) and
     permute tokens locally: rows for rank 0's experts come first, then rank 1's, ...
  2. all_to_all the per-expert counts, then the token rows (variable splits);
  3. regroup the received rows by local expert, run the bank's experts, undo the regrouping;
  4. all_to_all the outputs back and combine them with the routing weights.
The all-to-all is an autograd Function (its backward is the reverse all-to-all), and uses only
torch.distributed.all_to_all_single, so gloo (CPU) and NCCL (GPU) run the same code.

Dedup dispatch (`ExpertParallel.dedup`, the default; recipe knob parallel.moe_dedup), as in
DeepSpeed-TED, Tutel and DeepEP: a token is sent once per destination *rank*, however many of its
top-k experts live there, with its per-choice local expert ids and routing weights; the receiver
replicates the row to those experts, sums their weighted outputs, and returns one row. Off-rank
rows then depend on the placement (a token whose choices share a rank costs one row), which is
what makes co-selection placement (kiln.parallel.placement, coselect) move fewer bytes. Every
expert sees the same rows in the same order as the plain dispatch, so expert inputs, outputs and
weight gradients are bitwise equal; a token's k weighted outputs are summed per rank first, then
over ranks, which equals the plain sum exactly for top_k <= 2 (two terms commute) and up to
rounding of the summation order for top_k >= 3.

The model is reached through the MoE block protocol (see kiln.model.moe's docstring): blocks
with `router`, `experts`, `expert_compute` and `num_experts`. This file never imports the model.
"""
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kiln import kernels
from kiln.parallel.placement.io import PlacementError, check_placement


class A2AStats:
    """All-to-all bytes sent to other ranks and time spent, per process (`A2A_STATS`).

    Times are wall clock on CPU; on CUDA they come from events resolved at `snapshot` (which
    synchronises), so the hot path never waits for the GPU.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self.bytes, self.calls, self.seconds, self._events = 0, 0, 0.0, []

    def snapshot(self, reset: bool = True) -> dict:
        """{"bytes": off-rank bytes sent, "calls": n, "seconds": time in all-to-alls}."""
        if self._events:
            torch.cuda.synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events = []
        out = {"bytes": self.bytes, "calls": self.calls, "seconds": self.seconds}
        if reset:
            self.reset()
        return out


A2A_STATS = A2AStats()


def _all_to_all(x: torch.Tensor, in_splits, out_splits, group) -> torch.Tensor:
    """Rows of x split by in_splits go to each rank; returns the rows received (out_splits)."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    me = dist.get_rank(group)
    A2A_STATS.bytes += (sum(in_splits) - in_splits[me]) * x[:1].numel() * x.element_size()
    A2A_STATS.calls += 1
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
        end.record()
        A2A_STATS._events.append((start, end))
    else:
        t = time.perf_counter()
        dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
        A2A_STATS.seconds += time.perf_counter() - t
    return out


class AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with variable splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        return _all_to_all(x, in_splits, out_splits, group)

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        return _all_to_all(grad, out_splits, in_splits, ctx.group), None, None, None


class ExpertLayout:
    """Index tables of a placement for R ranks: bank slots, dispatch order, local experts."""

    def __init__(self, placement, ranks: int):
        p = np.asarray(placement)
        if p.ndim != 2:
            raise PlacementError(f"placement must be [L, E] (got shape {p.shape}); recompute it")
        self.placement = check_placement(p, p.shape[0], p.shape[1], ranks)
        self.layers, self.experts = self.placement.shape
        self.ranks = ranks
        self.slots = [[(l, e) for l in range(self.layers) for e in range(self.experts)
                       if self.placement[l, e] == r] for r in range(ranks)]
        self.slot_index = [{le: i for i, le in enumerate(s)} for s in self.slots]
        self.order = [np.argsort(row, kind="stable") for row in self.placement]  # by (rank, e)
        self.rank_sizes = [np.bincount(row, minlength=ranks).tolist() for row in self.placement]

    def position_table(self, l: int) -> torch.Tensor:
        """[E+1] dispatch position of each expert of layer l; the drop sentinel E stays last."""
        pos = np.empty(self.experts + 1, dtype=np.int64)
        pos[self.order[l]] = np.arange(self.experts)
        pos[self.experts] = self.experts
        return torch.from_numpy(pos)

    def local_slots(self, l: int, r: int) -> list:
        """Bank slots of rank r's experts of layer l, in dispatch (ascending expert) order."""
        return [self.slot_index[r][(l, int(e))] for e in self.order[l] if self.placement[l, e] == r]


class ExpertBank(nn.Module):
    """This rank's S experts over all MoE layers as stacked SwiGLU weights (see module doc)."""

    def __init__(self, experts_cls, slots: int, dim: int, ffn: int, device, dtype):
        super().__init__()
        # built on meta and only then given memory: the caller fills every slot
        self.experts = experts_cls(slots, dim, ffn, seed=0, deferred=True).to_empty(device=device).to(dtype)
        for p in self.experts.parameters():
            p.kiln_expert = True

    def forward(self, x, tokens_per_expert, ids):
        return self.experts(x, tokens_per_expert, ids)


class EPDispatch:
    """The `expert_compute` of one MoE layer under expert parallelism (see module doc)."""

    def __init__(self, ep: "ExpertParallel", layer: int):
        self.ep, self.layer = ep, layer
        self._pos = {}

    def refresh(self) -> None:
        """Drop cached tables (after a placement change)."""
        self._pos = {}

    def _tables(self, device):
        """(rank of each expert [E+1], its index among its rank's experts [E+1]); sentinel E ->
        (R, -1)."""
        if ("dedup", device) not in self._pos:
            lay, l = self.ep.layout, self.layer
            rank_of = np.append(lay.placement[l], lay.ranks)
            bounds = np.cumsum([0] + lay.rank_sizes[l])
            local = lay.position_table(l).numpy() - np.append(bounds[lay.placement[l]], lay.experts + 1)
            self._pos["dedup", device] = (torch.from_numpy(rank_of).to(device),
                                          torch.from_numpy(local).to(device))
        return self._pos["dedup", device]

    def __call__(self, block, x, expert_idx, weights):
        if self.ep.dedup:
            return self._dedup(block, x, expert_idx, weights)
        return self._plain(block, x, expert_idx, weights)

    def _dedup(self, block, x, expert_idx, weights):
        """One row per (token, destination rank); see the module doc."""
        ep, l = self.ep, self.layer
        r, R, (n, k), dim = ep.rank, ep.ranks, expert_idx.shape, x.shape[1]
        rank_of, local_of = self._tables(x.device)
        dest = rank_of[expert_idx]                                            # [N, k], R = dropped
        earlier = torch.ones(k, k, dtype=torch.bool, device=x.device).tril(-1)
        first = ~((dest[:, :, None] == dest[:, None, :]) & earlier).any(2) & (dest < R)
        tok, ch = first.nonzero(as_tuple=True)                                # token-major
        order = torch.argsort(dest[tok, ch], stable=True)                     # by rank, then token
        tok, ch = tok[order], ch[order]
        row_dest = dest[tok, ch]
        in_splits = torch.bincount(row_dest, minlength=R)
        out_splits = _all_to_all(in_splits, [1] * R, [1] * R, ep.group).tolist()
        in_splits = in_splits.tolist()
        here = dest[tok] == row_dest[:, None]                                 # [rows, k]
        ids = torch.where(here, local_of[expert_idx[tok]], -1).to(torch.int32)
        w_send = torch.where(here, weights[tok], torch.zeros((), dtype=weights.dtype, device=x.device))
        ids_recv = _all_to_all(ids, in_splits, out_splits, ep.group).long()
        payload = AllToAll.apply(torch.cat([x[tok], w_send.to(x.dtype)], 1), in_splits, out_splits, ep.group)
        x_recv, w_recv = payload[:, :dim], payload[:, dim:]
        m, c = (ids_recv >= 0).nonzero(as_tuple=True)                         # received choices
        ex = ids_recv[m, c]
        group = torch.argsort(ex, stable=True)                                # by local expert, stable
        size = ep.layout.rank_sizes[l][r]
        if group.numel():
            y_g = ep.bank(x_recv[m[group]], torch.bincount(ex, minlength=size).tolist(), ep.local_slots[l])
        else:  # nothing to compute here; the bank still joins the graph (zero gradients)
            y_g = ep.bank(x_recv, [0] * size, ep.local_slots[l])
        at = torch.empty_like(group)
        at[group] = torch.arange(group.numel(), device=x.device)
        rmap = torch.full((x_recv.shape[0], k), group.numel(), dtype=torch.long, device=x.device)
        rmap[m, c] = at                                                       # pads -> a zero row
        y_pad = torch.cat([y_g, y_g.new_zeros(1, y_g.shape[1])])
        partial = kernels.moe_unpermute(y_pad, rmap, w_recv)                  # summed on this rank
        y = AllToAll.apply(partial, out_splits, in_splits, ep.group)
        hmap = torch.full((n, k), y.shape[0], dtype=torch.long, device=x.device)
        hmap[tok, ch] = torch.arange(y.shape[0], device=x.device)
        y_pad = torch.cat([y, y.new_zeros(1, y.shape[1])])
        return kernels.moe_unpermute(y_pad, hmap, first.to(y.dtype))          # over the ranks

    def _plain(self, block, x, expert_idx, weights):
        """One row per token-choice (the dispatch before dedup)."""
        ep, l = self.ep, self.layer
        lay, r, R, e_num = ep.layout, ep.rank, ep.ranks, block.num_experts
        if x.device not in self._pos:
            self._pos[x.device] = lay.position_table(l).to(x.device)
        x_perm, counts, row_map = kernels.moe_permute(x, self._pos[x.device][expert_idx], e_num + 1)
        sizes = lay.rank_sizes[l]
        recv_counts = _all_to_all(counts[:e_num], sizes, [sizes[r]] * R, ep.group).view(R, sizes[r])
        per_expert = counts[:e_num].tolist()
        bounds = np.cumsum([0] + sizes)
        in_splits = [sum(per_expert[bounds[i]:bounds[i + 1]]) for i in range(R)]
        out_splits = recv_counts.sum(1).tolist()
        kept = sum(in_splits)
        x_recv = AllToAll.apply(x_perm[:kept], in_splits, out_splits, ep.group)
        if x_recv.shape[0]:
            local = torch.arange(sizes[r], device=x.device).repeat(R)
            local_ids = torch.repeat_interleave(local, recv_counts.reshape(-1))
            x_g, tokens, regroup = kernels.moe_permute(x_recv, local_ids[:, None], sizes[r])
            y_g = ep.bank(x_g, tokens, ep.local_slots[l])
            y_recv = kernels.moe_unpermute(y_g, regroup, torch.ones_like(regroup, dtype=y_g.dtype))
        else:  # nothing to compute here; the bank still joins the graph (zero gradients)
            y_recv = ep.bank(x_recv, [0] * sizes[r], ep.local_slots[l])
        y = AllToAll.apply(y_recv, out_splits, in_splits, ep.group)
        if kept < x_perm.shape[0]:
            y = torch.cat([y, y.new_zeros(x_perm.shape[0] - kept, y.shape[1])])
        return kernels.moe_unpermute(y, row_map, weights)


def moe_blocks(model: nn.Module) -> list:
    """The model's MoE blocks in layer order (found by protocol, not by class)."""
    return [m for m in model.modules()
            if all(hasattr(m, a) for a in ("router", "experts", "expert_compute", "num_experts"))]


class ExpertParallel:
    """Handle kept on the model as `model.kiln_ep`: group, layout, bank and per-layer dispatch."""

    def __init__(self, group, layout: ExpertLayout, bank: ExpertBank, blocks: list, dedup: bool = True):
        self.group, self.layout, self.bank, self.blocks = group, layout, bank, blocks
        self.dedup = dedup  # one row per (token, rank); False: one per token-choice (module doc)
        self.rank, self.ranks = dist.get_rank(group), dist.get_world_size(group)
        self.dispatch = [EPDispatch(self, l) for l in range(len(blocks))]
        self.set_layout(layout)

    def set_layout(self, layout: ExpertLayout) -> None:
        """Switch the index tables to `layout` (the bank rows must already match it)."""
        self.layout = layout
        self.local_slots = [layout.local_slots(l, self.rank) for l in range(layout.layers)]
        for d in self.dispatch:
            d.refresh()

    @property
    def placement(self) -> np.ndarray:
        return self.layout.placement


def contiguous_placement(layers: int, experts: int, ranks: int) -> np.ndarray:
    """Megatron's layout (expert e on rank e // (E/R)); round-robin when R does not divide E."""
    from kiln.parallel.placement import contiguous, round_robin

    return contiguous(layers, experts, ranks) if experts % ranks == 0 else round_robin(layers, experts, ranks)


def apply_expert_parallel(model: nn.Module, ep_group, placement=None, dedup: bool = True) -> ExpertParallel:
    """Shard the experts of every MoE block of `model` over `ep_group` under `placement`.

    placement: [L, E] rank ids (None = contiguous). Every rank must call this with the same
    placement and the same initial weights (same seed): each keeps its own experts' rows in a new
    `model.expert_bank` and drops the blocks' full expert weights. A model built with
    expert_device="meta" (kiln.model.Transformer) has no full expert weights: each rank then builds only its
    own experts from their seeds (`experts.expert_init(e)`), the same values. Returns (and stores
    as `model.kiln_ep`) the handle used by migrate() and the checkpoint helpers. dedup: send one
    row per (token, destination rank) (see the module doc; `model.kiln_ep.dedup` switches it).
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("apply_expert_parallel: the model has no MoE blocks (set model.mlp=moe)")
    ranks = dist.get_world_size(ep_group)
    L, E = len(blocks), blocks[0].num_experts
    if placement is None:
        placement = contiguous_placement(L, E, ranks)
    layout = ExpertLayout(placement, ranks)
    if (layout.layers, layout.experts) != (L, E):
        raise PlacementError(f"placement is [{layout.layers}, {layout.experts}] but the model has "
                             f"{L} MoE layers of {E} experts; recompute the placement for this model")
    me = dist.get_rank(ep_group)
    first = blocks[0].experts
    ffn, dim = first.w1.shape[1], first.w1.shape[2]
    dense = next(p for p in model.parameters() if not p.is_meta)  # where the bank lives
    bank = ExpertBank(type(first), len(layout.slots[me]), dim, ffn, dense.device, dense.dtype)
    with torch.no_grad():
        for i, (l, e) in enumerate(layout.slots[me]):
            experts = blocks[l].experts
            rows = experts.expert_init(e) if experts.w1.is_meta else \
                [getattr(experts, name)[e] for name in ("w1", "w3", "w2")]
            for name, row in zip(("w1", "w3", "w2"), rows):
                getattr(bank.experts, name)[i].copy_(row)
    model.add_module("expert_bank", bank)
    ep = ExpertParallel(ep_group, layout, bank, blocks, dedup)
    for l, block in enumerate(blocks):
        block.experts = None  # the bank holds this rank's share; the full weights go
        block.expert_compute = ep.dispatch[l]
    model.kiln_ep = ep
    return ep


def grad_norm(params, ep_group=None) -> float | None:
    """Global L2 norm of the parameters' (already averaged) gradients. Expert-bank parameters
    (`p.kiln_expert`) hold different experts on each rank of `ep_group`: their squares are summed
    over that group, the others' are equal on every rank and counted once. None without grads."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    sq = [torch.zeros((), dtype=torch.float64, device=params[0].device) for _ in range(2)]
    for p in params:
        sq[bool(getattr(p, "kiln_expert", False))] += p.grad.double().square().sum()
    if ep_group is not None:
        dist.all_reduce(sq[1], group=ep_group)
    return float((sq[0] + sq[1]).sqrt())


def gather_experts(model: nn.Module) -> dict:
    """Every expert's weights in placement-independent form: {name: [L, E, ...]} on every rank
    (all_gather over the expert group; bank shapes are equal on all ranks). For tests and tools."""
    ep = model.kiln_ep
    out = {}
    for name in ("w1", "w3", "w2"):
        w = getattr(ep.bank.experts, name).detach()
        parts = [torch.empty_like(w) for _ in range(ep.ranks)]
        dist.all_gather(parts, w.contiguous(), group=ep.group)
        full = w.new_empty((ep.layout.layers, ep.layout.experts) + tuple(w.shape[1:]))
        for r, slots in enumerate(ep.layout.slots):
            for i, (l, e) in enumerate(slots):
                full[l, e] = parts[r][i]
        out[name] = full
    return out
