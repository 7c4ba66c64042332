"""Zigzag layout: which chunks a rank holds, exact round trips, errors, and the gathered
unshard on real gloo ranks."""
import pytest
import torch

from kiln.parallel.zigzag import zigzag_merge, zigzag_positions, zigzag_shard, zigzag_unshard
from tests.dist import run_ranks


def test_rank_holds_chunks_r_and_2n_minus_1_minus_r():
    x = torch.arange(16).view(1, 16)  # 4 ranks -> 8 chunks of 2
    assert zigzag_shard(x, 4, rank=0).tolist() == [[0, 1, 14, 15]]
    assert zigzag_shard(x, 4, rank=1).tolist() == [[2, 3, 12, 13]]
    assert zigzag_shard(x, 4, rank=3).tolist() == [[6, 7, 8, 9]]
    assert zigzag_positions(16, 4, rank=1).tolist() == [2, 3, 12, 13]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_merge_inverts_shard_on_any_dim(world):
    x = torch.randn(3, 2 * world * 5, 4)
    for dim in (1, 0):
        y = x if dim == 1 else x.transpose(0, 1).contiguous()
        shards = [zigzag_shard(y, world, dim=dim, rank=r) for r in range(world)]
        assert all(s.shape[dim] == y.shape[dim] // world for s in shards)
        assert torch.equal(zigzag_merge(shards, dim=dim), y)
    pos = torch.cat([zigzag_positions(2 * world * 5, world, r) for r in range(world)])
    assert sorted(pos.tolist()) == list(range(2 * world * 5))


def test_errors_are_one_clear_line():
    with pytest.raises(ValueError, match=r"not divisible by 2 x 4 ranks = 8"):
        zigzag_shard(torch.zeros(1, 12), 4, rank=0)
    with pytest.raises(ValueError, match="needs rank="):
        zigzag_shard(torch.zeros(1, 16), 4)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        zigzag_shard(torch.zeros(1, 16), 4, rank=4)


def _unshard(rank, world):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 4 * world * 3, 5, generator=g)
    doc = torch.arange(4 * world * 3).repeat(2, 1)
    mine = zigzag_shard(full, None, dim=1)  # the default group gives world and rank
    return {"same_as_int": torch.equal(mine, zigzag_shard(full, world, rank=rank)),
            "full": torch.equal(zigzag_unshard(mine, None, dim=1), full),
            "doc": torch.equal(zigzag_unshard(zigzag_shard(doc, None), None), doc)}


@pytest.mark.slow
def test_unshard_gathers_and_restores_order():
    for res in run_ranks(_unshard, 2, timeout=120):
        assert res == {"same_as_int": True, "full": True, "doc": True}
