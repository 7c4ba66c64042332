"""FLOP and parameter counts: the one formula that MFU, the decomposition metrics and the benches use."""

from kiln.model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (all linear layers incl. the LM head;
    for MoE layers the router and the experts a token is routed to, not all experts)."""
    d, h = cfg.dim, cfg.hidden_dim
    attn = d * cfg.n_heads * cfg.head_dim * 2 + d * cfg.kv_heads * cfg.head_dim * 2
    moe = cfg.moe_layers
    # an MoE layer: the router plus the top_k routed and the shared experts each token passes
    active = d * cfg.moe.num_experts + 3 * d * (cfg.moe.expert_ffn_dim or h) * (cfg.moe.top_k + cfg.moe.shared_experts)
    return cfg.n_layers * attn + (cfg.n_layers - moe) * 3 * d * h + moe * active + d * cfg.vocab_size


def attention_flops(cfg: ModelConfig, pairs: float) -> float:
    """Training FLOPs (forward + backward = 3x forward) of softmax attention over `pairs`
    (query, key) pairs: QK^T and PV each cost 2 * head_dim FLOPs per pair and head."""
    return 3 * 2 * 2 * cfg.head_dim * cfg.n_heads * cfg.n_layers * pairs


def causal_pairs(rows: int, seq_len: int) -> float:
    """(query, key) pairs of causal attention over rows x seq_len: L(L+1)/2 per row (what a
    kernel that skips the masked half computes; no document masks)."""
    return rows * seq_len * (seq_len + 1) / 2


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul params + attention scores.

    Counts the full S x S attention (every token attends to S keys, no causal discount), as
    PaLM's MFU does.
    """
    return 6 * matmul_params(cfg) + attention_flops(cfg, seq_len)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of a model of `cfg` without building it (count_params of the built model)."""
    from kiln.model.config import mlp_kind

    d, h = cfg.dim, cfg.hidden_dim
    attn = d * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * d
    width = cfg.moe.expert_ffn_dim or h
    mlp = {"swiglu": 3 * d * h,
           "moe": cfg.moe.num_experts * (d + 3 * d * width) + 3 * d * width * cfg.moe.shared_experts}
    layers = sum(2 * d + attn + mlp[mlp_kind(cfg, i)] for i in range(cfg.n_layers))
    return cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + layers + d


def count_params(model) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_memory_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, dp: int = 1, zero_stage: int = 0,
                       ep: int = 1) -> dict:
    """A rough lower bound of one rank's training memory, in bytes, by part: fp32 weights, grads
    and AdamW's two moments (16 bytes a parameter; ZeRO shards the moments from stage 1, the grads
    from 2 and the weights at 3 over `dp` ranks; MoE experts over `ep`), and the activations kept
    for the backward pass (about 16 fp32 values of width `dim` per token and layer, plus the fp32
    logits and their gradient). Meant to refuse a recipe that cannot fit, not to plan one that can."""
    params = param_count(cfg)
    if cfg.mlp == "moe" and ep > 1:  # each rank holds 1/ep of the routed experts
        width = cfg.moe.expert_ffn_dim or cfg.hidden_dim
        experts = cfg.moe_layers * cfg.moe.num_experts * 3 * cfg.dim * width
        params -= experts - experts // ep
    shard = max(1, dp)
    weights = 4 * params / (shard if zero_stage >= 3 else 1)
    grads = 4 * params / (shard if zero_stage >= 2 else 1)
    moments = 8 * params / (shard if zero_stage >= 1 else 1)
    tokens = micro_batch * seq_len
    activations = 4 * tokens * (16 * cfg.dim * cfg.n_layers + 2 * cfg.vocab_size)
    parts = {"weights": weights, "grads": grads, "optimizer": moments, "activations": activations}
    return {k: int(v) for k, v in parts.items()}
