"""Tiny random models for the inference tests: a dense and an MoE kiln Transformer."""
import pytest
import torch

from kiln.model import ModelConfig, Transformer
from kiln.model.config import MoEConfig

VOCAB = 97


def tiny(mlp: str = "swiglu", seed: int = 0, **moe) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp=mlp,
                      moe=MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_ffn_dim": 48, **moe}))
    return Transformer(cfg).eval()


def copy_of(model: Transformer) -> Transformer:
    m = Transformer(model.cfg)
    m.load_state_dict(model.state_dict())
    return m.eval()


@pytest.fixture
def dense():
    return tiny()


@pytest.fixture
def moe():
    return tiny("moe")


def prompts(n: int = 5, seed: int = 1) -> list[list[int]]:
    """Prompts of different lengths (1 to 9 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(1, 10, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]
