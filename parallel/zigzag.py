"""Zigzag sequence layout for causal load balance.

The sequence is cut into 2N equal chunks; rank r of N holds chunks r and 2N-1-r, concatenated
in that order. Early chunks are cheap under a causal mask and late ones expensive, so pairing
them gives every rank the same attention work. Works on any tensor with a sequence dim:
tokens, labels, position ids, doc ids, activations.

`group_or_world` arguments take either a torch.distributed process group (None = the default
group; world size and rank come from it) or an int world size, in which case `rank` must be
given (single-process use, e.g. in the data loader).
"""
import torch
import torch.distributed as dist


def _world_and_rank(group_or_world, rank):
    if isinstance(group_or_world, int):
        if rank is None:
            raise ValueError("zigzag with an int world size needs rank=...; pass rank or a group")
        world = group_or_world
    else:
        world = dist.get_world_size(group_or_world)
        rank = dist.get_rank(group_or_world) if rank is None else rank
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"zigzag needs 0 <= rank < world, got rank {rank} of {world}")
    return world, rank


def _chunk_len(length: int, world: int, dim: int) -> int:
    if length % (2 * world):
        raise ValueError(f"sequence length {length} (dim {dim}) is not divisible by 2 x {world} "
                         f"ranks = {2 * world}; pad or choose a length that is a multiple of it")
    return length // (2 * world)


def zigzag_positions(seq_len: int, group_or_world=None, rank=None, device=None) -> torch.Tensor:
    """Global positions (int64) of the seq_len / N tokens that `rank` holds, in local order."""
    world, rank = _world_and_rank(group_or_world, rank)
    c = _chunk_len(seq_len, world, 0)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c, device=device)
    return torch.cat([first, second])


def zigzag_shard(x: torch.Tensor, group_or_world=None, dim: int = 1, rank=None) -> torch.Tensor:
    """This rank's zigzag shard of the full tensor x along `dim` (a new contiguous tensor)."""
    world, rank = _world_and_rank(group_or_world, rank)
    c = _chunk_len(x.shape[dim], world, dim)
    first = x.narrow(dim, rank * c, c)
    second = x.narrow(dim, (2 * world - 1 - rank) * c, c)
    return torch.cat([first, second], dim=dim)


def zigzag_merge(shards, dim: int = 1) -> torch.Tensor:
    """Inverse of zigzag_shard in one process: the full tensor from the N shards in rank order."""
    world = len(shards)
    c = _chunk_len(shards[0].shape[dim] * world, world, dim)
    firsts = [s.narrow(dim, 0, c) for s in shards]
    seconds = [s.narrow(dim, c, c) for s in reversed(shards)]
    return torch.cat(firsts + seconds, dim=dim)


def zigzag_unshard(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Gather every rank's shard (all_gather over `group`) and restore the sequence order.

    Every rank of the group must call it with shards of equal shape; not differentiable.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return zigzag_merge(parts, dim=dim)
