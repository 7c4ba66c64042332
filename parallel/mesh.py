"""Process groups, built once per run.

Ranks are laid out data-major: rank = dp_rank * sp + sp_rank, so the ranks of one sequence
(which talk every attention block) are neighbours, i.e. on the same node when possible.
Gradients are averaged over every rank (data x sequence), which is DeepSpeed's default group.
"""
from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class Mesh:
    """This rank's coordinates and the groups it belongs to."""

    rank: int
    world: int
    sp: int
    sp_group: object = None
    dp_group: object = None
    ep: int = 1
    ep_group: object = None   # ep consecutive ranks: the all-to-all of MoE dispatch
    edp_group: object = None  # ranks holding the same experts: their gradients are averaged here

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp


def build_mesh(sp: int = 1, ep: int = 1) -> Mesh:
    """Create the sequence-, data- and expert-parallel groups (every rank must call this, same
    order). Expert groups are DeepSpeed's (see kiln.parallel.expert_deepspeed), so that its
    gradient reduction and kiln's all-to-all agree on who holds which experts."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp:
        raise ValueError(f"world size {world} is not a multiple of parallel.sp={sp}")
    if world % ep:
        raise ValueError(f"world size {world} is not a multiple of parallel.ep={ep}")
    mesh = Mesh(rank=rank, world=world, sp=sp, ep=ep)
    for d in range(world // sp):  # new_group is collective: every rank creates every group
        g = dist.new_group(list(range(d * sp, (d + 1) * sp)))
        if d == mesh.dp_rank:
            mesh.sp_group = g
    for s in range(sp):
        g = dist.new_group(list(range(s, world, sp)))
        if s == mesh.sp_rank:
            mesh.dp_group = g
    if ep > 1:
        from kiln.parallel.expert_deepspeed import expert_groups

        mesh.ep_group, mesh.edp_group = expert_groups(ep)
    return mesh
