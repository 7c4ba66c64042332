"""Pieces shared by TokenRing and Ring Attention: group handling, input checks, the zigzag
causal block schedule, the log-sum-exp merge of partial outputs, and one step of p2p traffic.

Both algorithms expect q/k/v (and doc ids) in zigzag layout (parallel/zigzag.py): local rows
[0, c) are global chunk r and rows [c, 2c) global chunk 2N-1-r, with c = S_local / 2.
"""
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kiln.kernels.block_attention import compute_dtype
from kiln.parallel.comm import COMM_STATS

_CHECKED: set = set()  # (group ranks, local signature) already validated across ranks


@dataclass(frozen=True)
class RingGroup:
    """The ring: this rank's position and the global ranks of every member (for p2p)."""

    group: object
    world: int
    rank: int
    ranks: tuple

    def next(self, hops: int = 1) -> int:
        """Group rank `hops` places after this one (negative: before)."""
        return (self.rank + hops) % self.world


def ring_group(group) -> RingGroup:
    """Resolve a process group (None = default group; no dist at all = a ring of one)."""
    if not dist.is_available() or not dist.is_initialized():
        return RingGroup(None, 1, 0, (0,))
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    return RingGroup(group, len(ranks), dist.get_rank(group), ranks)


def check_inputs(q, k, v, doc_ids, causal: bool, rg: RingGroup) -> None:
    """Local shape checks, then (once per shape signature) the same shapes on every rank."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"sequence-parallel attention expects q [B, S, Hq, D] and k, v "
                         f"[B, S, Hkv, D] of equal shape; got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dims differ: q has {q.shape[3]}, k/v have {k.shape[3]}; "
                         f"project q, k and v to the same head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads "
                         f"{k.shape[2]}; choose n_heads divisible by n_kv_heads")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k/v shards differ in batch or length: q{tuple(q.shape)} "
                         f"k{tuple(k.shape)}; shard q, k and v the same way")
    if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"doc_ids must be [B, S_local] = {tuple(q.shape[:2])}, "
                         f"got {tuple(doc_ids.shape)}")
    if rg.world == 1:
        return
    if causal and q.shape[1] % 2:
        raise ValueError(f"local sequence length {q.shape[1]} is odd; the zigzag causal layout "
                         f"needs 2 chunks per rank: make the sequence a multiple of "
                         f"{2 * rg.world} and shard it with zigzag_shard")
    sig = (tuple(q.shape), tuple(k.shape), doc_ids is not None, causal)
    if (rg.ranks, sig) in _CHECKED:
        return
    # One small all_gather per new shape signature (not per call): a mismatch here would
    # otherwise show up as a hang or a size error deep inside the p2p exchange.
    mine = torch.tensor([*q.shape, *k.shape, doc_ids is not None, causal], device=q.device)
    every = [torch.empty_like(mine) for _ in range(rg.world)]
    dist.all_gather(every, mine, group=rg.group)
    shapes = [tuple(t.tolist()) for t in every]
    if len(set(shapes)) != 1:
        per_rank = ", ".join(f"{s[0]}x{s[1]}x{s[2]}/{s[6]}x{s[3]}{' docs' * s[8]}"
                             f"{' causal' * s[9]}" for s in shapes)
        raise ValueError(f"sequence shards differ across ranks (B x S_local x Hq/Hkv x D per "
                         f"rank: {per_rank}); every rank must hold an equal zigzag shard and "
                         f"pass the same causal/doc_ids")
    _CHECKED.add((rg.ranks, sig))


def block_plan(q_rank: int, kv_rank: int, s_local: int, causal: bool):
    """Which rows of Q's shard meet which rows of K/V's shard: (q_lo, q_hi, kv_lo, kv_hi, causal).

    Zigzag causal: the local pair is causal on itself; Q from a lower rank only has its second
    chunk (late positions) see K/V, fully; Q from a higher rank sees K/V's first chunk fully.
    Either way a non-diagonal step costs exactly half a full block on every rank.
    """
    if not causal:
        return 0, s_local, 0, s_local, False
    c = s_local // 2
    if q_rank == kv_rank:
        return 0, s_local, 0, s_local, True
    if q_rank < kv_rank:
        return c, s_local, 0, s_local, False
    return 0, s_local, 0, c, False


def local_blocks(s_local: int, causal: bool):
    """A rank's own Q x own K/V, split into (first, last) lists of (q_lo, q_hi, kv_lo, kv_hi,
    causal) blocks: `first` runs at step 0 (hiding the first hand-over), `last` after the
    final step (hiding the final return of a partial, which would otherwise be exposed).
    Causal: first = late chunk x early chunk (full, c*c pairs); last = the two diagonal
    chunks (causal, c*c pairs in all). Together they are exactly the local causal block.
    """
    c = s_local // 2
    if causal:
        return [(c, s_local, 0, c, False)], [(0, c, 0, c, True), (c, s_local, c, s_local, True)]
    first = [(0, c, 0, s_local, False)] if c else []
    return first, [(c, s_local, 0, s_local, False)]


def q_rows(q_rank, kv_rank, s_local, causal):
    """Rows of Q's shard that rank kv_rank needs."""
    return block_plan(q_rank, kv_rank, s_local, causal)[:2]


def kv_rows(q_rank, kv_rank, s_local, causal):
    """Rows of K/V's shard that rank q_rank needs."""
    return block_plan(q_rank, kv_rank, s_local, causal)[2:4]


def schedule_work(world: int, s_local: int, impl: str = "tokenring", causal: bool = True):
    """Query-key pairs each rank computes in one forward (its attention FLOPs / (4 * heads * d)).

    TokenRing: rank r runs Q of every rank against its own K/V; Ring: its own Q against every
    K/V. A causal diagonal block counts its visible pairs, n(n+1)/2.
    """
    work = []
    for r in range(world):
        total = 0
        for other in range(world):
            q_rank, kv_rank = (other, r) if impl == "tokenring" else (r, other)
            ql, qh, kl, kh, diag = block_plan(q_rank, kv_rank, s_local, causal)
            n, m = qh - ql, kh - kl
            total += n * (n + 1) // 2 if diag else n * m
        work.append(total)
    return work


def schedule_flops(world, s_local, heads, head_dim, impl="tokenring", causal=True, batch=1):
    """Per-rank forward attention FLOPs of the zigzag schedule (QK^T and PV, 2 FLOPs per MAC)."""
    return [4 * batch * heads * head_dim * w for w in schedule_work(world, s_local, impl, causal)]


def contiguous_work(world: int, s_local: int):
    """Per-rank causal pairs if shards were contiguous (no zigzag): the imbalance zigzag fixes."""
    return [r * s_local * s_local + s_local * (s_local + 1) // 2 for r in range(world)]


def merge_partial(out, lse, lo, hi, out_b, lse_b) -> None:
    """Fold a partial (out_b [B, n, H, D], lse_b [B, H, n]) into rows [lo, hi) of the running
    (out [B, S, H, D], lse [B, H, S]), in place, in the accumulators' dtype (fp32 / fp64).

    out <- out*exp(lse - new) + out_b*exp(lse_b - new), new = logaddexp(lse, lse_b): the
    METHODS.md sigmoid form, written so that rows with lse = lse_b = -inf stay 0, not NaN.
    """
    o, l_ = out[:, lo:hi], lse[:, :, lo:hi]
    lse_b = lse_b.to(lse.dtype)
    new = torch.logaddexp(l_, lse_b)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w_a = torch.exp(l_ - safe).transpose(1, 2).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    o.mul_(w_a).add_(out_b.to(o.dtype) * w_b)
    l_.copy_(new)


def empty_accumulators(q):
    """Running output [B, S, H, D] = 0 and lse [B, H, S] = -inf in the arithmetic dtype."""
    cd = compute_dtype(q.dtype)
    b, s, h, d = q.shape
    return (torch.zeros(b, s, h, d, dtype=cd, device=q.device),
            torch.full((b, h, s), float("-inf"), dtype=cd, device=q.device))


class Exchange:
    """The p2p messages of one ring step: posted together, started before the block compute,
    waited on after it. Tags keep message kinds apart on gloo; NCCL matches by order, which
    is the same on both ends because every rank builds its list in the same order."""

    def __init__(self, rg: RingGroup, phase: str):
        self.rg, self.phase, self.ops, self.works = rg, phase, [], []

    def send(self, tensor, peer: int, direction: str, tag: int) -> None:
        """Queue a send of `tensor` to group rank `peer`, counted under `direction`."""
        tensor = tensor.contiguous()
        self.ops.append(dist.P2POp(dist.isend, tensor, self.rg.ranks[peer], self.rg.group, tag))
        COMM_STATS.record(self.phase, direction, tensor.numel() * tensor.element_size())

    def recv(self, shape, dtype, device, peer: int, tag: int):
        """Queue a receive from group rank `peer`; returns the (not yet filled) buffer."""
        buf = torch.empty(shape, dtype=dtype, device=device)
        self.ops.append(dist.P2POp(dist.irecv, buf, self.rg.ranks[peer], self.rg.group, tag))
        return buf

    def send_rows(self, tensors, dims, lo, hi, peer, direction, tag0):
        """Send rows [lo, hi) (relative) of each tensor along its sequence dim."""
        for i, (t, dim) in enumerate(zip(tensors, dims)):
            self.send(t.narrow(dim, lo, hi - lo), peer, direction, tag0 + i)

    def recv_rows(self, like, dims, n, peer, tag0):
        """Receive n rows of tensors shaped like `like` along their sequence dims."""
        out = []
        for i, (t, dim) in enumerate(zip(like, dims)):
            shape = list(t.shape)
            shape[dim] = n
            out.append(self.recv(shape, t.dtype, t.device, peer, tag0 + i))
        return out

    def start(self) -> None:
        """Launch every queued op (async; overlaps with whatever runs before wait())."""
        if self.ops:
            self.works = dist.batch_isend_irecv(self.ops)

    def wait(self) -> None:
        """Block until every op of this step is done (the time blocked is counted: on gloo the
        communication the block compute did not hide; NCCL's wait only orders the streams)."""
        t = time.perf_counter()
        for w in self.works:
            w.wait()
        COMM_STATS.wait_s += time.perf_counter() - t
        self.ops, self.works = [], []
