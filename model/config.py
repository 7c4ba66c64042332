"""The model's recipe sections: `model:` (ModelConfig) and its `model.moe:` subsection (MoEConfig).

Plain ranges are field metadata (min/gt/max/lt, "zero" = what 0 means) that the recipe loader
enforces before validate(); validate() holds the checks that span fields.
"""
from dataclasses import dataclass, field


@dataclass
class MoEConfig:
    """Mixture-of-Experts MLP (used when model.mlp = moe)."""

    num_experts: int = field(default=8, metadata={"help": "routed experts per MoE layer", "min": 1})
    top_k: int = field(default=2, metadata={"help": "experts each token is sent to", "min": 1})
    every_n_layers: int = field(default=1, metadata={
        "help": "layer i is MoE when i % every_n_layers == 0 (Megatron's moe_layer_freq); others dense",
        "min": 1})
    capacity_factor: float = field(default=0.0, metadata={
        "help": "0 = dropless; else each expert takes at most ceil(cf * tokens * top_k / E) choices",
        "min": 0, "zero": "0 = dropless"})
    aux_loss_coef: float = field(default=0.01, metadata={
        "help": "coefficient of the switch load-balancing loss E * sum_e f_e * P_e"})
    z_loss_coef: float = field(default=0.001, metadata={
        "help": "coefficient of the router z-loss mean(logsumexp(logits)^2)"})
    shared_experts: int = field(default=0, metadata={
        "help": "always-on experts added to every token (one SwiGLU of shared_experts x expert width)",
        "min": 0})
    expert_ffn_dim: int = field(default=0, metadata={
        "help": "hidden size of one expert; 0 = the model's ffn size", "min": 0, "zero": "0 = derived"})
    renormalize: bool = field(default=True, metadata={
        "help": "rescale the top-k probabilities to sum to 1 (only when top_k > 1)"})

    def validate(self):
        """Checks across fields; each field's own range is in its metadata."""
        if self.top_k > self.num_experts:
            raise ValueError(f"model.moe.top_k ({self.top_k}) must be <= model.moe.num_experts "
                             f"({self.num_experts})")
        if 0 < self.capacity_factor * self.top_k < 1e-9:
            raise ValueError("model.moe.capacity_factor is too small to keep any token; use 0 (dropless) "
                             "or a value like 1.25")

    def is_moe_layer(self, i: int) -> bool:
        """Whether transformer layer i (0-based) gets the MoE block."""
        return i % self.every_n_layers == 0


@dataclass
class ModelConfig:
    """A Llama-style decoder (or bidirectional encoder)."""

    vocab_size: int = field(default=0, metadata={
        "help": "vocabulary size; 0 = the tokenizer's, rounded up to a multiple of 64",
        "min": 0, "zero": "0 = derived"})
    dim: int = field(default=256, metadata={"help": "hidden size", "min": 1})
    n_layers: int = field(default=4, metadata={"help": "transformer blocks", "min": 1})
    n_heads: int = field(default=4, metadata={"help": "query heads", "min": 1})
    n_kv_heads: int = field(default=0, metadata={
        "help": "key/value heads (GQA); 0 = n_heads", "min": 0, "zero": "0 = derived"})
    ffn_dim: int = field(default=0, metadata={
        "help": "MLP hidden size; 0 = 8/3 * dim rounded up to a multiple of 64",
        "min": 0, "zero": "0 = derived"})
    mlp: str = field(default="swiglu", metadata={
        "help": "MLP block: swiglu (dense) or moe (experts in the layers model.moe selects)",
        "choices": ["swiglu", "moe"]})
    moe: MoEConfig = field(default_factory=MoEConfig, metadata={
        "help": "Mixture-of-Experts settings (used when mlp = moe)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base", "gt": 0})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon", "gt": 0})
    tie_embeddings: bool = field(default=False, metadata={
        "help": "share the token embedding with the LM head"})
    causal: bool = field(default=True, metadata={
        "help": "true = causal decoder; false = bidirectional encoder"})
    init_std: float = field(default=0.02, metadata={
        "help": "init std; residual output projections get std / sqrt(2 * n_layers)", "gt": 0})

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or -(-(8 * self.dim // 3) // 64) * 64

    def validate(self):
        """Checks across fields (the ranges ran first, so n_heads >= 1 here)."""
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads "
                             f"({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim dim/n_heads = {self.head_dim} must be even for RoPE: "
                             "change model.dim or model.n_heads")
        if self.mlp == "moe":
            self.moe.validate()

    @property
    def moe_layers(self) -> int:
        """How many layers carry the MoE block (0 for a dense model)."""
        if self.mlp != "moe":
            return 0
        return sum(self.moe.is_moe_layer(i) for i in range(self.n_layers))


def mlp_kind(cfg: ModelConfig, layer: int) -> str:
    """The MLP block of layer `layer`: model.mlp, except dense where model.moe skips a layer."""
    if cfg.mlp == "moe" and not cfg.moe.is_moe_layer(layer):
        return "swiglu"
    return cfg.mlp
