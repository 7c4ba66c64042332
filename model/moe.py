"""The Mixture-of-Experts MLP block: top-k softmax router, SwiGLU experts, auxiliary losses.

No distributed code lives here. The block exposes a small protocol that kiln.parallel.expert
uses to shard the experts without importing this file (nor this file it):
  * ``block.router(x) -> (expert_idx [N, k], weights [N, k], aux)``; a choice dropped by the
    capacity limit has ``expert_idx == num_experts`` (a sentinel bucket) and weight 0.
  * ``block.experts(x_grouped, tokens_per_expert, ids=None)``: SwiGLU experts stored as stacked
    [E, ...] parameters, applied to rows already grouped by expert.
  * ``block.expert_compute(block, x, expert_idx, weights) -> y``: the replaceable seam; the
    default permutes locally, runs ``block.experts`` and combines. Expert parallelism swaps it.
  * after each forward ``block.aux_loss`` holds the coefficient-weighted load-balancing +
    router z-loss (a scalar tensor for the objective to add) and ``block.stats`` the unweighted
    parts and the drop count.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln import kernels
from kiln.model.config import MoEConfig

kernels.load()  # the torch implementations, with the model: a first call under torch.compile meets no import


def load_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style E * sum_e f_e * P_e: f_e = share of the N*k choices routed to e (before any
    capacity drop), P_e = mean router probability of e. Equals 1 when routing is uniform."""
    n, k = expert_idx.shape
    f = torch.bincount(expert_idx.reshape(-1), minlength=num_experts).to(probs.dtype) / (n * k)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def capacity_drop(expert_idx: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Bool [N, k]: True where a choice is kept. Each expert keeps its first `capacity` choices in
    priority order: all first choices (token order) before any second choice (GShard)."""
    n, k = expert_idx.shape
    flat = expert_idx.t().reshape(-1)                  # choice-major priority
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(order)
    pos[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return (pos < capacity).view(k, n).t()


class Router(nn.Module):
    """Top-k softmax router. Returns (expert_idx [N, k], weights [N, k], aux dict).

    aux: "load_balance" and "z" (unweighted scalars), "dropped" (choices dropped by capacity,
    an int tensor), "loss" = aux_loss_coef * load_balance + z_loss_coef * z.
    Logits are computed in (at least) fp32: bf16 router logits flip top-k choices easily.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, x):
        cfg, n = self.cfg, x.shape[0]
        dt = torch.promote_types(x.dtype, torch.float32)  # at least fp32
        logits = F.linear(x.to(dt), self.weight.to(dt))
        probs = logits.softmax(-1)
        top_p, idx = probs.topk(cfg.top_k, dim=-1)
        if cfg.renormalize and cfg.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        lb = load_balance_loss(probs, idx, cfg.num_experts)
        z = router_z_loss(logits)
        dropped = torch.zeros((), dtype=torch.long, device=x.device)
        if cfg.capacity_factor > 0:
            capacity = math.ceil(cfg.capacity_factor * n * cfg.top_k / cfg.num_experts)
            keep = capacity_drop(idx, cfg.num_experts, capacity)
            dropped = (~keep).sum()
            idx = torch.where(keep, idx, torch.full_like(idx, cfg.num_experts))
            top_p = top_p * keep
        aux = {"load_balance": lb, "z": z, "dropped": dropped,
               "loss": cfg.aux_loss_coef * lb + cfg.z_loss_coef * z}
        return idx, top_p.to(x.dtype), aux


class SwiGLUExperts(nn.Module):
    """`num` SwiGLU experts as stacked parameters w1, w3 [num, ffn, dim] and w2 [num, dim, ffn].

    forward(x, tokens_per_expert, ids) runs expert ids[j] (default j) on the j-th group of rows of
    x; stacking lets parallel code shard, move and re-slot experts as plain tensor rows.
    Expert e is initialised from its own generator (seed, e), so any subset of the experts can be
    built alone and equals the same rows of the whole stack. `seed` None draws it from torch's
    global generator; `deferred` leaves the weights on the meta device.
    """

    def __init__(self, num: int, dim: int, ffn: int, seed=None, deferred: bool = False):
        super().__init__()
        device = "meta" if deferred else None
        self.w1 = nn.Parameter(torch.empty(num, ffn, dim, device=device))
        self.w3 = nn.Parameter(torch.empty(num, ffn, dim, device=device))
        self.w2 = nn.Parameter(torch.empty(num, dim, ffn, device=device))
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        self.reset_parameters(seed, 0.02, 0.02)

    def reset_parameters(self, seed, std: float, out_std: float) -> None:
        """Normal(0, std) for w1/w3 and Normal(0, out_std) for w2, expert by expert from `seed`."""
        self.init_seed, self.init_stds = seed, (std, std, out_std)
        if self.w1.is_meta:
            return
        with torch.no_grad():
            for e in range(self.w1.shape[0]):
                for p, w in zip((self.w1, self.w3, self.w2), self.expert_init(e)):
                    p[e].copy_(w)

    def expert_init(self, e: int) -> tuple:
        """Expert e's initial (w1, w3, w2) as new fp32 CPU tensors."""
        seed = np.random.SeedSequence([*np.atleast_1d(self.init_seed).tolist(), e]).generate_state(1, np.uint64)
        g = torch.Generator().manual_seed(int(seed[0] >> np.uint64(1)))
        return tuple(torch.randn(p.shape[1:], generator=g) * s
                     for p, s in zip((self.w1, self.w3, self.w2), self.init_stds))

    def forward(self, x, tokens_per_expert, ids=None):
        sizes = [int(c) for c in tokens_per_expert.tolist()] if torch.is_tensor(tokens_per_expert) \
            else list(tokens_per_expert)
        ids = range(len(sizes)) if ids is None else ids
        if x.shape[0] == 0:
            # Keep x and the weights in the graph: under expert parallelism a rank that received
            # no tokens must still run the backward all-to-all the other ranks wait for, and
            # every rank must produce (zero) weight gradients for the reduction.
            zero = 0 * (x.sum() + self.w1.sum() + self.w3.sum() + self.w2.sum())
            return x.new_zeros(0, self.w2.shape[1]) + zero
        h = kernels.swiglu(kernels.grouped_linear(x, self.w1, sizes, ids),
                           kernels.grouped_linear(x, self.w3, sizes, ids))
        return kernels.grouped_linear(h, self.w2, sizes, ids)


def local_expert_compute(block, x, expert_idx, weights):
    """Default expert computation on one device: permute, run experts, combine.

    The sentinel bucket E (capacity-dropped choices) sorts last; its rows get zero output.
    """
    e = block.num_experts
    x_perm, counts, row_map = kernels.moe_permute(x, expert_idx, e + 1)
    kept = x_perm.shape[0] - int(counts[e])
    y = block.experts(x_perm[:kept], counts[:e])
    if kept < x_perm.shape[0]:
        y = torch.cat([y, y.new_zeros(x_perm.shape[0] - kept, y.shape[1])])
    return kernels.moe_unpermute(y, row_map, weights)


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts) in place of the dense MLP.

    expert_device="meta" leaves the routed experts without memory: expert parallelism then
    initialises only the rows its rank keeps, from each expert's own seed (SwiGLUExperts.expert_init).
    """

    def __init__(self, dim: int, ffn_dim: int, cfg: MoEConfig, expert_device=None):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        width = cfg.expert_ffn_dim or ffn_dim
        self.router = Router(dim, cfg)
        # the seed is drawn here either way, so a deferred build leaves torch's generator where a
        # full build does (ranks under expert parallelism then build the same dense weights)
        self.experts = SwiGLUExperts(cfg.num_experts, dim, width, seed=int(torch.randint(0, 2**62, ())),
                                     deferred=expert_device == "meta")
        self.shared = None
        if cfg.shared_experts:
            self.shared = SwiGLUExperts(1, dim, cfg.shared_experts * width)
        self.expert_compute = local_expert_compute
        self.aux_loss = None
        self.stats = {}

    @classmethod
    def from_model_config(cls, cfg, expert_device=None) -> "MoE":
        """Build from a ModelConfig carrying a `moe` section (the MLP_BLOCKS entry)."""
        return cls(cfg.dim, cfg.hidden_dim, cfg.moe, expert_device)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        idx, w, aux = self.router(x2)
        self.aux_loss = aux["loss"]
        self.stats = {k: v.detach() for k, v in aux.items() if k != "loss"}
        y = self.expert_compute(self, x2, idx, w)
        if self.shared is not None:
            y = y + self.shared(x2, [x2.shape[0]])
        return y.view(shape)


def moe_aux_loss(model: nn.Module):
    """Sum of the aux losses stashed by every MoE block in the last forward (None if no MoE)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
