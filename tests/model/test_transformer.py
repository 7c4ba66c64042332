"""The model: shapes, causality, document masking, encoder mode, init, FLOPs formula."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.model import ModelConfig, MoEConfig, Transformer, flops_per_token, matmul_params
from kiln.trainer.objectives import CausalLM


def tiny(**kw):
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    base.update(kw)
    return ModelConfig(**base)


def build(cfg, dtype=torch.float64):
    torch.manual_seed(0)
    return Transformer(cfg).to(dtype)


def test_shapes_and_gqa_params():
    cfg = tiny()
    m = build(cfg)
    x = torch.randint(0, 97, (3, 11))
    h = m(x)
    assert h.shape == (3, 11, 32)
    assert m.logits(h).shape == (3, 11, 97)
    assert m.layers[0].attn.k_weight().shape == (2 * 8, 32)  # 2 kv heads of dim 8
    n = sum(p.numel() for p in m.parameters())
    norms = 32 * (2 * 2 + 1)
    assert n == matmul_params(cfg) + 97 * 32 + norms  # + embedding + norm gains


def test_causality_future_tokens_do_not_change_past_logits():
    m = build(tiny())
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 97, (2, 7))
    a, b = m.logits(m(x)), m.logits(m(y))
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_document_masking_isolates_documents():
    m = build(tiny())
    x = torch.randint(0, 97, (1, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    y = x.clone()
    y[:, 5:] = torch.randint(0, 97, (1, 7))  # change document B entirely
    a = m.logits(m(x, pos, docs))
    b = m.logits(m(y, pos, docs))
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-12, rtol=0)
    # document A alone, as its own sequence, gives the same logits
    alone = m.logits(m(x[:, :5]))
    assert torch.allclose(a[:, :5], alone, atol=1e-12, rtol=0)
    # and B (positions restarted) equals B alone
    assert torch.allclose(a[:, 5:], m.logits(m(x[:, 5:])), atol=1e-12, rtol=0)


def test_encoder_mode_is_bidirectional():
    m = build(tiny(causal=False))
    x = torch.randint(0, 97, (1, 10))
    y = x.clone()
    y[0, 9] = (x[0, 9] + 1) % 97
    a, b = m.logits(m(x)), m.logits(m(y))
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first token sees the last one


def test_tied_embeddings_share_storage_and_train():
    m = build(tiny(tie_embeddings=True))
    assert m.output_weight is m.embed.weight
    x = torch.randint(0, 97, (2, 9))
    CausalLM(m)(x[:, :-1], x[:, 1:]).backward()
    assert m.embed.weight.grad is not None and m.embed.weight.grad.abs().sum() > 0


def test_scaled_residual_init():
    cfg = tiny(n_layers=8, dim=256, n_heads=4, n_kv_heads=4, vocab_size=512)
    m = Transformer(cfg)
    std_in = m.layers[0].attn.q_weight().std().item()
    std_out = m.layers[0].attn.wo.weight.std().item()
    assert abs(std_in - 0.02) < 0.002
    assert abs(std_out - 0.02 / math.sqrt(16)) < 0.0005


def naive_attention(q, k, v, *, causal, scale=None, doc_ids=None):
    """Matmul attention so that the FLOP counter sees the score and value products."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("tie", [False, True])
def test_flops_formula_matches_counted_training_flops(tie):
    cfg = tiny(tie_embeddings=tie, dim=48, n_heads=6, n_kv_heads=3, vocab_size=200)
    m = build(cfg, torch.float32)
    for layer in m.layers:
        layer.attn.attn_fn = naive_attention
    b, s = 2, 24
    x = torch.randint(0, 200, (b, s))
    with FlopCounterMode(display=False) as counter:
        loss = m.logits(m(x)).logsumexp(-1).sum()
        loss.backward()
    assert counter.get_total_flops() == flops_per_token(cfg, s) * b * s


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True), dict(n_kv_heads=1, ffn_dim=48),
                                dict(mlp="moe", moe=MoEConfig(num_experts=4, shared_experts=1, every_n_layers=2,
                                                              expert_ffn_dim=24))])
def test_param_count_equals_the_built_models(kw):
    from kiln.model import count_params, param_count

    cfg = ModelConfig(vocab_size=96, dim=32, n_layers=3, n_heads=4, **kw)
    assert param_count(cfg) == count_params(Transformer(cfg))
