"""A Llama-style transformer. No parallel code lives here, and nothing here imports kiln.parallel.

Parallelism is applied afterwards from kiln.parallel by replacing each Attention's `attn_fn`
(sequence parallel) or the blocks' `mlp` (experts); fused ops come from kiln.kernels.
"""
import math

import torch
from torch import nn

from kiln import kernels
from kiln.model.config import ModelConfig, mlp_kind
from kiln.model.moe import MoE, SwiGLUExperts


kernels.load()  # the torch implementations, with the model: a first call under torch.compile meets no import

class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention with RoPE.

    `attn_fn(q, k, v, *, causal, scale, doc_ids)` does the softmax attention on [B, S, H, D]
    tensors; it is the seam where sequence parallelism plugs in.

    Q, K and V come from one projection `wqkv` (rows: Hq heads, then Hkv, then Hkv): one GEMM
    instead of three, which runs nearer the machine's peak (thin K/V GEMMs are the least
    efficient); `q_weight`/`k_weight`/`v_weight` give the three row blocks as views.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal = cfg.causal
        self.split = (cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
        self.wqkv = nn.Linear(cfg.dim, sum(self.split), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attn_fn = kernels.attention

    def forward(self, x, cos, sin, doc_ids):
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = q.view(b, s, self.n_heads, self.head_dim)
        k, v = k.view(b, s, self.n_kv, self.head_dim), v.view(b, s, self.n_kv, self.head_dim)
        q, k = kernels.apply_rope(q, cos, sin), kernels.apply_rope(k, cos, sin)
        out = self.attn_fn(q, k, v, causal=self.causal, scale=None, doc_ids=doc_ids)
        return self.wo(out.reshape(b, s, -1))

    def q_weight(self) -> torch.Tensor:
        return self.wqkv.weight[: self.split[0]]

    def k_weight(self) -> torch.Tensor:
        return self.wqkv.weight[self.split[0]: self.split[0] + self.split[1]]

    def v_weight(self) -> torch.Tensor:
        return self.wqkv.weight[self.split[0] + self.split[1]:]


class SwiGLU(nn.Module):
    """The gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


# MLP blocks by `model.mlp`: (model config, expert device) -> block.
MLP_BLOCKS = {"swiglu": lambda cfg, expert_device=None: SwiGLU(cfg), "moe": MoE.from_model_config}


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, layer: int = 0, expert_device=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP_BLOCKS[mlp_kind(cfg, layer)](cfg, expert_device)

    def forward(self, x, cos, sin, doc_ids):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids)
        return x + self.mlp(self.mlp_norm(x))


class OutputHead(nn.Module):
    """The LM head. With labels it returns the fused linear + cross-entropy loss, so that the
    [tokens, vocab] logits never exist; without, the logits. Tied heads borrow the embedding.

    The loss is computed in this module's forward so that ZeRO-3 gathers the weight around it.
    """

    def __init__(self, dim: int, vocab: int, tied_to: nn.Embedding | None = None):
        super().__init__()
        self._tied = [tied_to] if tied_to is not None else None  # a list: not a submodule
        self.weight = None if tied_to is not None else nn.Parameter(torch.empty(vocab, dim))

    @property
    def matrix(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, hidden, labels=None, z_loss: float = 0.0):
        if labels is None:
            return hidden @ self.matrix.t()
        return kernels.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.matrix,
                                            labels.reshape(-1), z_loss=z_loss)


class Transformer(nn.Module):
    """Token embedding -> blocks -> final norm; `head` turns hidden states into logits or a loss.

    expert_device="meta" builds the routed experts of MoE layers without memory, for expert
    parallelism to fill with each rank's own (kiln.parallel.expert.apply_expert_parallel); every
    other weight, and torch's generator afterwards, are those of a full build.
    """

    def __init__(self, cfg: ModelConfig, expert_device=None):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be resolved (>0) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, expert_device) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = OutputHead(cfg.dim, cfg.vocab_size, self.embed if cfg.tie_embeddings else None)
        self.reset_parameters()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.head.matrix

    def reset_parameters(self) -> None:
        """Normal(0, std) everywhere; residual projections scaled by 1/sqrt(2L) (GPT-NeoX/Llama)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        experts = [m for m in self.modules() if isinstance(m, SwiGLUExperts)]
        if experts:  # expert by expert from their own seeds (see SwiGLUExperts)
            base = int(torch.randint(0, 2**62, ()))
            for i, m in enumerate(experts):
                m.reset_parameters([base, i], std, out_std)
        own = {id(p) for m in experts for p in m.parameters()}
        for name, p in self.named_parameters():
            if id(p) in own:
                continue
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def compile_blocks(self) -> None:
        """torch.compile every block in place, so its elementwise work fuses (first steps compile)."""
        for layer in self.layers:
            layer.compile()

    def forward(self, input_ids, position_ids=None, doc_ids=None):
        """Final hidden states [B, S, dim]. position_ids default to 0..S-1; doc_ids mask documents."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        cos, sin = kernels.rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids)
        return self.norm(x)

    def logits(self, hidden):
        """Full logits (for evaluation and tests; training uses the fused loss)."""
        return self.head(hidden)
