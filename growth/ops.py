"""Growth operators: pure functions from (state dict, model config) to (grown state dict, config).

State dicts use kiln.model.Transformer's parameter names (`layers.<i>.<...>`, `embed.weight`,
`norm.weight`, `head.weight`), unsharded and on any device.

* stack (G_stack): L layers become g*L by repeating the whole stack, new layer i = old layer
  (i mod L); embeddings, final norm and head are copied verbatim; MoE layers bring their router,
  experts and shared experts along. No noise, no rescaling.
* zero (the function-preserving G_zero baseline): stack, then the output projections of every new
  layer (attention `wo`, the MLP's or experts' and shared experts' `w2`) start at zero, so each new
  block adds nothing to the residual stream and the grown model computes the small one's function.
* upcycle (sparse upcycling, as Megatron does at the start of a run): every layer the large config
  makes MoE gets E copies of its dense MLP as experts and a fresh router. With exact copies the MoE
  computes the dense MLP's function (the routing weights of a token sum to 1).
"""
import dataclasses
import re

import torch

from kiln.model.config import ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def _split(state: dict) -> tuple[dict, dict]:
    """({layer: {rest: tensor}}, {other name: tensor})."""
    layers, other = {}, {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            other[name] = t
    return layers, other


def stack(state: dict, cfg: ModelConfig, factor: int) -> tuple[dict, ModelConfig]:
    """G_stack: repeat the whole stack `factor` times (see the module docstring)."""
    if factor < 2:
        raise ValueError(f"growth factor must be >= 2 (got {factor})")
    L = cfg.n_layers
    if cfg.mlp == "moe" and L % cfg.moe.every_n_layers:
        raise ValueError(f"stacking {L} layers with model.moe.every_n_layers={cfg.moe.every_n_layers} would "
                         "put dense layers where MoE ones belong: make the small model's n_layers a multiple "
                         "of every_n_layers")
    layers, other = _split(state)
    if sorted(layers) != list(range(L)):
        raise ValueError(f"state dict has layers {sorted(layers)}, the config {L}")
    grown = dict(other)
    for i in range(factor * L):
        for rest, t in layers[i % L].items():
            grown[f"layers.{i}.{rest}"] = t.clone()
    return grown, dataclasses.replace(cfg, n_layers=factor * L)


def zero(state: dict, cfg: ModelConfig, factor: int) -> tuple[dict, ModelConfig]:
    """stack, with every new layer's output projections at zero (the same function)."""
    grown, big = stack(state, cfg, factor)
    for name, t in grown.items():
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= cfg.n_layers and name.endswith(("attn.wo.weight", ".w2.weight", ".w2")):
            grown[name] = torch.zeros_like(t)
    return grown, big


def upcycle(state: dict, small: ModelConfig, large: ModelConfig, seed: int = 0,
            noise: float = 0.0) -> tuple[dict, ModelConfig]:
    """Dense MLPs become MoE blocks of `large` (same layers and widths): experts are copies of the
    MLP (+ Gaussian noise of `noise` x the weight's std), routers are fresh Normal(0, 0.02)."""
    if small.mlp != "swiglu" or large.mlp != "moe":
        raise ValueError("upcycle grows a dense model (mlp=swiglu) into an MoE one (mlp=moe)")
    moe = large.moe
    same = {f: getattr(small, f) for f in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size")}
    if same != {f: getattr(large, f) for f in same}:
        raise ValueError(f"upcycle keeps the model's shape: small {same} vs large "
                         f"{ {f: getattr(large, f) for f in same} }")
    if (moe.expert_ffn_dim or large.hidden_dim) != small.hidden_dim or moe.shared_experts:
        raise ValueError("upcycle copies the dense MLP into each expert: set model.moe.expert_ffn_dim to "
                         f"0 or {small.hidden_dim} (the MLP's width) and model.moe.shared_experts to 0")
    g = torch.Generator().manual_seed(seed)
    grown = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if not m or not moe.is_moe_layer(int(m.group(1))) or ".mlp." not in name:
            grown[name] = t.clone()
            continue
        prefix, w = name.rsplit(".mlp.", 1)[0], name.rsplit(".", 2)[-2]  # w1 / w3 / w2
        copies = t.unsqueeze(0).repeat(moe.num_experts, 1, 1)
        if noise:
            copies = copies + torch.randn(copies.shape, generator=g).to(t) * noise * t.float().std().to(t)
        grown[f"{prefix}.mlp.experts.{w}"] = copies
        router = f"{prefix}.mlp.router.weight"
        if router not in grown:
            grown[router] = (torch.randn(moe.num_experts, large.dim, generator=g) * 0.02).to(t)
    return grown, large


def grow(op: str, state: dict, small: ModelConfig, large: ModelConfig, factor: int, *, seed: int = 0,
         noise: float = 0.0) -> dict:
    """The grown state dict for `large`, by operator name (stack | zero | upcycle)."""
    if op == "upcycle":
        grown, cfg = upcycle(state, small, large, seed=seed, noise=noise)
    elif op in ("stack", "zero"):
        grown, cfg = (stack if op == "stack" else zero)(state, small, factor)
    else:
        raise ValueError(f"unknown growth operator {op!r}: stack, zero or upcycle")
    if cfg.n_layers != large.n_layers:
        raise ValueError(f"growing {small.n_layers} layers x {factor} gives {cfg.n_layers}, but the large "
                         f"model has {large.n_layers}: set growth.factor or the small model's n_layers")
    return grown
