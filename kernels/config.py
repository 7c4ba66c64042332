"""The recipe's `kernels:` section (plain ranges are field metadata, enforced by the recipe loader)."""
from dataclasses import dataclass, field


@dataclass
class KernelsConfig:
    """Which implementation the fused ops use."""

    use: str = field(default="auto", metadata={
        "help": "auto = Triton on CUDA tensors and torch on CPU; triton forces Triton "
                "(on CPU only under TRITON_INTERPRET=1); torch forces the torch references",
        "choices": ["auto", "triton", "torch"]})
    ce_chunk_tokens: int = field(default=0, metadata={
        "help": "tokens per chunk in the fused linear + cross-entropy (never the full logits); "
                "0 = auto: 2048 on GPU, on CPU at most 16 MiB of fp32 logits per chunk",
        "min": 0, "zero": "0 = auto"})
