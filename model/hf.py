"""The Hugging Face adapter: kiln's Transformer as transformers' LlamaForCausalLM (dense) or
MixtralForCausalLM (MoE), weights and config both ways.

Pure mappings on state dicts and configs; transformers is imported only inside `hf_config`.

What maps, and why the rest does not (each refusal is one line, `Unmappable`):
  * RoPE: kiln rotates halves (x1, x2) with inverse frequencies theta^(-2i/d), transformers'
    Llama convention exactly, so q/k rows need no permutation; attention scale 1/sqrt(head_dim).
  * RMSNorm with a gain, eps = norm_eps; SwiGLU w1 = gate_proj, w3 = up_proj, w2 = down_proj.
  * The fused `wqkv` rows are Hq heads, then Hkv, then Hkv (GQA): split into q/k/v_proj.
  * Tied embeddings: tie_word_embeddings, no lm_head.weight in the file.
  * MoE maps onto Mixtral only where Mixtral computes the same function: softmax over every
    expert, top-k, renormalised to sum 1, every layer MoE, no shared experts, no capacity drop
    (kiln's drop depends on the batch, Mixtral never drops). kiln's aux and z losses shape
    training only, not the forward, so they map (aux as router_aux_loss_coef).
  * Bidirectional encoders (causal=false) are not causal LMs: refused.
"""
import torch

from kiln.model.config import ModelConfig, MoEConfig

LLAMA, MIXTRAL = "LlamaForCausalLM", "MixtralForCausalLM"


class Unmappable(ValueError):
    """A kiln model or HF checkpoint with no faithful counterpart; the message is one line."""


def architecture(cfg: ModelConfig) -> str:
    """LlamaForCausalLM or MixtralForCausalLM for `cfg`, or Unmappable naming what does not map."""
    if not cfg.causal:
        raise Unmappable("model.causal=false (a bidirectional encoder) has no Llama/Mixtral counterpart: "
                         "only causal decoders export to Hugging Face")
    if cfg.mlp != "moe":
        return LLAMA
    m, why = cfg.moe, []
    if m.shared_experts:
        why.append(f"shared experts (model.moe.shared_experts={m.shared_experts})")
    if m.every_n_layers != 1 and cfg.n_layers > 1:
        why.append(f"dense layers between MoE layers (model.moe.every_n_layers={m.every_n_layers})")
    if m.capacity_factor > 0:
        why.append(f"a capacity limit that drops tokens (model.moe.capacity_factor={m.capacity_factor})")
    if m.top_k == 1:
        why.append("top_k=1 (kiln weights the expert by its probability, Mixtral renormalises it to 1)")
    elif not m.renormalize:
        why.append("model.moe.renormalize=false (Mixtral always renormalises the top-k weights)")
    if why:
        raise Unmappable(f"this MoE model does not map onto Mixtral: {'; '.join(why)}; only "
                         "--format fp32 exports it")
    return MIXTRAL


def hf_config(cfg: ModelConfig, max_positions: int = 4096, eos_id: int | None = None,
              pad_id: int | None = None):
    """The transformers config (LlamaConfig or MixtralConfig) of a model of `cfg`."""
    arch = architecture(cfg)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                  hidden_act="silu", max_position_embeddings=max_positions, rms_norm_eps=cfg.norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
                  tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                  attention_dropout=0.0, use_cache=True,
                  # kiln has no BOS: documents follow an EOT, so EOT serves as both (GPT-2's way)
                  bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, architectures=[arch])
    if arch == LLAMA:
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=cfg.hidden_dim, attention_bias=False, mlp_bias=False, **common)
    from transformers import MixtralConfig

    return MixtralConfig(intermediate_size=cfg.moe.expert_ffn_dim or cfg.hidden_dim,
                         num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                         router_aux_loss_coef=cfg.moe.aux_loss_coef, router_jitter_noise=0.0,
                         output_router_logits=False, sliding_window=None, **common)


def _split_qkv(cfg: ModelConfig):
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim
    return q, kv, kv


def to_hf_state(state: dict, cfg: ModelConfig) -> dict:
    """kiln Transformer names -> the HF checkpoint names (Mixtral's per-expert layout on disk,
    `block_sparse_moe.experts.<e>.w1.weight`, the one vLLM and every transformers version read)."""
    arch = architecture(cfg)
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.n_layers):
        k, h = f"layers.{i}.", f"model.layers.{i}."
        q, kk, v = state[k + "attn.wqkv.weight"].split(_split_qkv(cfg), dim=0)
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": kk,
                    h + "self_attn.v_proj.weight": v, h + "self_attn.o_proj.weight": state[k + "attn.wo.weight"],
                    h + "input_layernorm.weight": state[k + "attn_norm.weight"],
                    h + "post_attention_layernorm.weight": state[k + "mlp_norm.weight"]})
        if arch == LLAMA:
            for kiln_w, hf_w in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{h}mlp.{hf_w}.weight"] = state[f"{k}mlp.{kiln_w}.weight"]
            continue
        out[h + "block_sparse_moe.gate.weight"] = state[k + "mlp.router.weight"]
        for w in ("w1", "w3", "w2"):
            for e, rows in enumerate(state[f"{k}mlp.experts.{w}"].unbind(0)):
                out[f"{h}block_sparse_moe.experts.{e}.{w}.weight"] = rows
    return {name: t.contiguous() for name, t in out.items()}


def _expert_stack(hf: dict, h: str, cfg: ModelConfig, w: str) -> torch.Tensor:
    """Expert weight w (w1/w3/w2) of layer prefix h as kiln's [E, ...] stack, from either the
    per-expert checkpoint layout or transformers 5's fused in-memory one (gate_up_proj, down_proj)."""
    e = cfg.moe.num_experts
    legacy = [f"{h}block_sparse_moe.experts.{i}.{w}.weight" for i in range(e)]
    if all(n in hf for n in legacy):
        return torch.stack([hf[n] for n in legacy])
    fused = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}[w]
    name = next((f"{h}{blk}.experts.{fused}" for blk in ("mlp", "block_sparse_moe")
                 if f"{h}{blk}.experts.{fused}" in hf), None)
    if name is None:
        found = sum(n.startswith(f"{h}block_sparse_moe.experts.") and n.endswith(f".{w}.weight") for n in hf)
        raise Unmappable(f"the checkpoint holds {found} of layer {h.split('.')[2]}'s {e} experts' {w} "
                         "weights: it is incomplete or not a Mixtral checkpoint")
    t = hf[name]
    if fused == "gate_up_proj":
        gate, up = t.chunk(2, dim=1)
        return gate if w == "w1" else up
    return t


def from_hf_state(hf: dict, cfg: ModelConfig) -> dict:
    """HF Llama/Mixtral names -> kiln Transformer names (the inverse of to_hf_state); the fused
    wqkv is concatenated back, experts are stacked."""
    arch = architecture(cfg)

    def get(name):
        if name not in hf:
            raise Unmappable(f"the checkpoint lacks {name}: it is incomplete or not a {arch[:-11]} checkpoint")
        return hf[name]

    out = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["head.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layers):
        k, h = f"layers.{i}.", f"model.layers.{i}."
        out[k + "attn.wqkv.weight"] = torch.cat([get(h + f"self_attn.{p}_proj.weight") for p in "qkv"])
        out[k + "attn.wo.weight"] = get(h + "self_attn.o_proj.weight")
        out[k + "attn_norm.weight"] = get(h + "input_layernorm.weight")
        out[k + "mlp_norm.weight"] = get(h + "post_attention_layernorm.weight")
        if arch == LLAMA:
            for kiln_w, hf_w in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{k}mlp.{kiln_w}.weight"] = get(f"{h}mlp.{hf_w}.weight")
            continue
        gate = next((hf[n] for n in (h + "block_sparse_moe.gate.weight", h + "mlp.gate.weight") if n in hf), None)
        out[k + "mlp.router.weight"] = gate if gate is not None else get(h + "block_sparse_moe.gate.weight")
        for w in ("w1", "w3", "w2"):
            out[f"{k}mlp.experts.{w}"] = _expert_stack(hf, h, cfg, w)
    return {name: t.contiguous() for name, t in out.items()}


def model_config_from_hf(c: dict) -> ModelConfig:
    """The kiln ModelConfig of an HF config.json (Llama or Mixtral), or Unmappable in one line."""
    arch = (c.get("architectures") or [None])[0]
    kind = c.get("model_type")
    if arch not in (LLAMA, MIXTRAL) and kind not in ("llama", "mixtral"):
        raise Unmappable(f"config.json describes {arch or kind or 'an unnamed model'}: kiln import-hf reads "
                         "LlamaForCausalLM and MixtralForCausalLM checkpoints only")
    moe = arch == MIXTRAL or kind == "mixtral"
    dim, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    why = []
    if c.get("hidden_act", "silu") != "silu":
        why.append(f"hidden_act={c['hidden_act']} (kiln's SwiGLU uses silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        why.append("bias terms in attention or MLP")
    if rope_type != "default":
        why.append(f"RoPE scaling {rope_type!r}")
    if c.get("head_dim") not in (None, dim // heads):
        why.append(f"head_dim={c['head_dim']} differs from hidden_size/num_attention_heads={dim // heads}")
    if moe and c.get("sliding_window"):
        why.append(f"sliding-window attention ({c['sliding_window']})")
    if why:
        raise Unmappable(f"this {arch or kind} checkpoint uses what kiln's model does not have: {'; '.join(why)}")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    cfg = ModelConfig(vocab_size=int(c["vocab_size"]), dim=dim, n_layers=int(c["num_hidden_layers"]),
                      n_heads=heads, n_kv_heads=int(c.get("num_key_value_heads") or heads),
                      ffn_dim=int(c["intermediate_size"]), rope_theta=float(theta),
                      norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                      init_std=float(c.get("initializer_range", 0.02)))
    if moe:
        cfg.mlp = "moe"
        cfg.moe = MoEConfig(num_experts=int(c["num_local_experts"]), top_k=int(c["num_experts_per_tok"]),
                            every_n_layers=1, capacity_factor=0.0, shared_experts=0,
                            expert_ffn_dim=int(c["intermediate_size"]), renormalize=True,
                            aux_loss_coef=float(c.get("router_aux_loss_coef", 0.01)))
    try:
        cfg.validate()
        architecture(cfg)
    except ValueError as e:
        raise Unmappable(f"config.json does not give a valid kiln model: {str(e).splitlines()[0]}") from None
    return cfg
