"""Routing profiler: per-layer expert loads and consecutive-layer transitions, for MoETuner.

Forward hooks on the MoE blocks' routers (the block protocol: `block.router(x)` returns
(expert_idx [N, k], weights, aux); tokens keep their order from one layer to the next) count,
on the device and without synchronising,
  * load[l, e]       token-choices routed to expert e of MoE layer l;
  * trans[l, e, f]   pairs (choice e in layer l, choice f in layer l+1) of the same token, all k*k
                     of them (kiln.parallel.placement.io's convention);
  * coselect[l, e, f] ordered pairs of distinct choices e, f of one token in layer l (what dedup
                     dispatch co-locates);
choices dropped by a capacity limit (expert_idx == E) are not counted. Two windows run side by
side: one for the logged metrics (reset at each log), one for the saved profile (reset at each
save). The cost per step is three bincounts per layer. `snapshot` sums the counts over all ranks.
"""
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kiln.parallel.comm import COMM_STATS
from kiln.parallel.expert import moe_blocks
from kiln.parallel.placement.io import RoutingProfile
from kiln.parallel.placement.metrics import rank_loads, rank_traffic

PROFILE_DIR = "profiles"
LATEST = "routing_latest.npz"


class _Counts:
    def __init__(self, layers, experts, device):
        self.load = torch.zeros(layers, experts, dtype=torch.long, device=device)
        self.trans = torch.zeros(max(layers - 1, 0), experts * experts, dtype=torch.long, device=device)
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.co = torch.zeros(layers, experts * experts, dtype=torch.long, device=device)


class RoutingProfiler:
    """Counts routing of `model`'s MoE blocks while `active` (see module doc)."""

    WINDOWS = ("metrics", "profile")

    def __init__(self, model: torch.nn.Module):
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError("RoutingProfiler: the model has no MoE blocks")
        self.layers, self.experts = len(self.blocks), self.blocks[0].num_experts
        self.top_k = self.blocks[0].top_k
        self.active = True
        self._prev = None
        self._counts = {}
        self._hooks = [b.router.register_forward_hook(self._hook(l)) for l, b in enumerate(self.blocks)]

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()

    def _window(self, name, device):
        if name not in self._counts:
            self._counts[name] = _Counts(self.layers, self.experts, device)
        return self._counts[name]

    def _hook(self, l: int):
        def hook(module, inputs, output):
            if not self.active or COMM_STATS.replaying:  # an activation-checkpoint replay routes again
                return
            idx = output[0].detach()
            E = self.experts
            load = torch.bincount(idx.reshape(-1), minlength=E + 1)[:E]
            trans = None
            if l > 0 and self._prev is not None and self._prev.shape[0] == idx.shape[0]:
                a, b = self._prev[:, :, None], idx[:, None, :]
                pairs = torch.where((a < E) & (b < E), a * E + b, E * E)  # drops -> discarded bin
                trans = torch.bincount(pairs.reshape(-1), minlength=E * E + 1)[:E * E]
            k = idx.shape[1]
            a, b = idx[:, :, None], idx[:, None, :]
            other = ~torch.eye(k, dtype=torch.bool, device=idx.device)        # distinct choices
            pairs = torch.where((a < E) & (b < E) & other, a * E + b, E * E)
            co = torch.bincount(pairs.reshape(-1), minlength=E * E + 1)[:E * E]
            self._prev = idx if l + 1 < self.layers else None
            for name in self.WINDOWS:
                c = self._window(name, idx.device)
                c.load[l] += load
                c.co[l] += co
                if trans is not None:
                    c.trans[l - 1] += trans
                if l == 0:
                    c.tokens += idx.shape[0]
        return hook

    def snapshot(self, window: str = "metrics", reset: bool = True, group=None) -> RoutingProfile | None:
        """The counts of `window` summed over the ranks of `group` (collective when torch.distributed
        is initialised: every rank must call it); None when nothing was routed."""
        c = self._counts.get(window)
        device = self.blocks[0].router.weight.device
        n, nt = self.layers * self.experts, max(self.layers - 1, 0) * self.experts ** 2
        flat = torch.zeros(1 + n + nt + self.layers * self.experts ** 2, dtype=torch.float64, device=device)
        if c is not None:
            flat[0] = c.tokens.double()
            flat[1:1 + n] = c.load.reshape(-1).double()
            flat[1 + n:1 + n + nt] = c.trans.reshape(-1).double()
            flat[1 + n + nt:] = c.co.reshape(-1).double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, group=group)
        if reset:
            self._counts.pop(window, None)
        flat = flat.cpu().numpy()
        if flat[0] < 1:
            return None
        L, E = self.layers, self.experts
        return RoutingProfile(load=flat[1:1 + n].reshape(L, E),
                              transitions=flat[1 + n:1 + n + nt].reshape(max(L - 1, 0), E, E),
                              tokens=int(flat[0]), top_k=self.top_k,
                              coselect=flat[1 + n + nt:].reshape(L, E, E))


def placement_quality(profile: RoutingProfile, placement: np.ndarray | None, ranks: int) -> dict:
    """Measured routing metrics: per-layer balancedness (mean/max tokens per rank; per expert when
    placement is None) and the fraction of consecutive-layer token-choice pairs changing rank."""
    if placement is None:
        placement, ranks = np.tile(np.arange(profile.experts), (profile.layers, 1)), profile.experts
    loads = rank_loads(profile, placement, ranks)
    mx = loads.max(1)
    bal = np.where(mx > 0, loads.mean(1) / np.maximum(mx, 1e-30), 1.0)
    out = {f"moe/balance/l{l}": float(b) for l, b in enumerate(bal)}
    out["moe/balance_min"] = float(bal.min())
    out["moe/balance_mean"] = float(bal.mean())
    total = profile.transitions.sum()
    if total > 0:
        traffic = rank_traffic(profile, placement, ranks)
        same = np.trace(traffic, axis1=1, axis2=2).sum()
        out["moe/cross_rank_frac"] = float(1 - same / total)
    return out


def save_profile(profile: RoutingProfile, run_dir, step: int | None = None, name: str | None = None) -> Path:
    """Write run_dir/profiles/<name or routing_step########>.npz and refresh routing_latest.npz."""
    d = Path(run_dir) / PROFILE_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / (name or f"routing_step{step:08d}.npz")
    profile.save(str(path))
    tmp = d / f".{LATEST}.tmp"
    profile.save(str(tmp))
    tmp.replace(d / LATEST)
    return path


def latest_profile(run_dir) -> Path:
    """run_dir/profiles/routing_latest.npz (may not exist)."""
    return Path(run_dir) / PROFILE_DIR / LATEST


def _heat(matrix: np.ndarray, cell: int) -> np.ndarray:
    """A white-to-red heatmap image (uint8 RGB) of a non-negative matrix, `cell` pixels per entry."""
    m = np.asarray(matrix, dtype=np.float64)
    v = m / m.max() if m.max() > 0 else m
    rgb = np.stack([255 * np.ones_like(v), 255 * (1 - v), 255 * (1 - v)], -1).astype(np.uint8)
    return np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))


def wandb_heatmaps(profile: RoutingProfile, cell: int = 8) -> dict:
    """W&B objects for a profile: "moe/load" and "moe/transition_l{l}" as wandb.Table
    (rows: layer / source expert, columns: experts; W&B plots tables as heatmaps), plus
    wandb.Image heatmaps when Pillow is installed (wandb.Image needs it). Works offline."""
    import importlib.util

    import wandb

    cols = [f"e{e}" for e in range(profile.experts)]
    out = {"moe/load": wandb.Table(columns=["layer"] + cols,
                                   data=[[l] + row.tolist() for l, row in enumerate(profile.load)])}
    for l, t in enumerate(profile.transitions):
        out[f"moe/transition_l{l}"] = wandb.Table(columns=["from"] + cols,
                                                  data=[[f"e{e}"] + row.tolist() for e, row in enumerate(t)])
    if importlib.util.find_spec("PIL") is not None:
        out["moe/load_heatmap"] = wandb.Image(_heat(profile.load, cell),
                                              caption="token-choices per expert (rows: MoE layers)")
        for l, t in enumerate(profile.transitions):
            out[f"moe/transition_heatmap_l{l}"] = wandb.Image(_heat(t, cell), caption=f"layer {l} -> {l + 1}")
    return out
