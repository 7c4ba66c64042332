"""The recipe's `kernels:` section."""
from dataclasses import dataclass, field


@dataclass
class KernelsConfig:
    """Which implementation the fused ops use."""

    use: str = field(default="auto", metadata={
        "help": "auto = Triton on CUDA tensors and torch on CPU; triton forces Triton "
                "(on CPU only under TRITON_INTERPRET=1); torch forces the torch references",
        "choices": ["auto", "triton", "torch"]})
    ce_chunk_tokens: int = field(default=2048, metadata={
        "help": "tokens per chunk in the fused linear + cross-entropy (never the full logits)"})

    def validate(self):
        if self.ce_chunk_tokens < 1:
            raise ValueError(f"kernels.ce_chunk_tokens must be >= 1 (got {self.ce_chunk_tokens})")
