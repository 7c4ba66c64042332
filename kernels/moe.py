"""MoE token permute / unpermute, torch path: the index computation and the reference ops.

moe_permute copies each token once per chosen expert into x_perm, grouped by expert in ascending
order and stable (token order) within an expert; row_map[n, c] is the x_perm row of token n's
c-th choice. moe_unpermute sums each token's k expert outputs weighted by its routing weights.
The index computation (a stable argsort) is torch in both paths; the row copies are the Triton
kernels in moe_triton.py. grouped_linear runs the experts' GEMMs on rows grouped by expert. This
file holds the torch references.
"""
import torch


def permute_indices(expert_idx: torch.Tensor, num_experts: int):
    """(row_map [N, k] int64, tokens_per_expert [E] int64) for expert_idx [N, k]."""
    flat = expert_idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    return row_map.view(expert_idx.shape), torch.bincount(flat, minlength=num_experts)


def moe_permute_ref(x: torch.Tensor, expert_idx: torch.Tensor, num_experts: int):
    """Torch moe_permute: (x_perm [N*k, D], tokens_per_expert [E], row_map [N, k])."""
    row_map, counts = permute_indices(expert_idx, num_experts)
    src = torch.empty_like(row_map.reshape(-1))
    src[row_map.reshape(-1)] = torch.arange(row_map.numel(), device=x.device) // row_map.shape[1]
    return x[src], counts, row_map


def moe_unpermute_ref(y_perm: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor):
    """Torch moe_unpermute: out[n] = sum_c weights[n, c] * y_perm[row_map[n, c]]."""
    out = (y_perm[row_map] * weights.unsqueeze(-1).to(y_perm.dtype)).sum(1)
    return out


def grouped_linear_ref(x: torch.Tensor, w: torch.Tensor, sizes: list, ids) -> torch.Tensor:
    """Rows of x [M, K] in consecutive groups of `sizes` rows; group j times w[ids[j]].T (w [G, N, K]).
    One GEMM per non-empty group: the oracle for the grouped kernel. x must have rows."""
    return torch.cat([rows @ w[e].t() for e, rows in zip(ids, torch.split(x, sizes)) if rows.shape[0]])
