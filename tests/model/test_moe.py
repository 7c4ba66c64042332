"""The MoE block: router, load-balancing and z-loss against hand computation (plain Python math),
dropless routing covers every token and equals a per-token fp64 loop, capacity mode drops and
counts exactly what GShard's priority rule says. All single-process, fp64, tolerance 1e-12."""
import math

import pytest
import torch

from kiln.model.moe import (MoE, MoEConfig, Router, capacity_drop, load_balance_loss,
                              moe_aux_loss, router_z_loss)

TOL = dict(atol=1e-12, rtol=1e-12)


def _router(weight, **cfg):
    r = Router(weight.shape[1], MoEConfig(num_experts=weight.shape[0], **cfg)).double()
    with torch.no_grad():
        r.weight.copy_(weight)
    return r


def test_router_top2_weights_and_losses_by_hand():
    # 2 tokens, 3 experts, dim 2: logits = x @ W^T are easy to read off
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    logits = [[2.0, 0.0, 2.0], [0.0, 1.0, 1.0]]
    idx, weights, aux = _router(w, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.25)(x)
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    # token 0: experts 0 and 2 tie at p = e^2/(2e^2+1); token 1: experts 1 and 2 tie
    assert sorted(idx[0].tolist()) == [0, 2] and sorted(idx[1].tolist()) == [1, 2]
    torch.testing.assert_close(weights, torch.full((2, 2), 0.5, dtype=torch.float64), **TOL)
    f = [1 / 4, 1 / 4, 2 / 4]                       # choices per expert / (N * k)
    p_mean = [(probs[0][e] + probs[1][e]) / 2 for e in range(3)]
    lb = 3 * sum(fe * pe for fe, pe in zip(f, p_mean))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 2
    assert abs(aux["load_balance"].item() - lb) < 1e-12
    assert abs(aux["z"].item() - z) < 1e-12
    assert abs(aux["loss"].item() - (0.5 * lb + 0.25 * z)) < 1e-12
    assert aux["dropped"].item() == 0


def test_router_top1_keeps_raw_probability_and_uniform_balance_is_one():
    w = torch.eye(4, dtype=torch.float64)
    x = torch.eye(4, dtype=torch.float64) * 3.0     # token n prefers expert n: perfectly balanced
    idx, weights, aux = _router(w, top_k=1)(x)
    assert idx[:, 0].tolist() == [0, 1, 2, 3]
    p = math.exp(3) / (math.exp(3) + 3)
    torch.testing.assert_close(weights[:, 0], torch.full((4,), p, dtype=torch.float64), **TOL)
    assert abs(aux["load_balance"].item() - 4 * 4 * (1 / 4) * (1 / 4)) < 1e-12  # = 1


def test_load_balance_and_z_loss_functions():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=torch.float64)
    idx = torch.tensor([[0], [0]])
    assert abs(load_balance_loss(probs, idx, 3).item() - 3 * (1.0 * 0.4)) < 1e-12
    logits = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert abs(router_z_loss(logits).item() - math.log(2) ** 2) < 1e-12


def _naive_moe(block, x):
    """Per-token loop: y_n = sum_c w_nc * expert_{e_nc}(x_n) + shared(x_n)."""
    idx, w, _ = block.router(x)
    ex = block.experts
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for c in range(idx.shape[1]):
            e = int(idx[n, c])
            if e == block.num_experts:
                continue
            h = torch.nn.functional.silu(ex.w1[e] @ x[n]) * (ex.w3[e] @ x[n])
            out[n] += w[n, c] * (ex.w2[e] @ h)
        if block.shared is not None:
            s = block.shared
            out[n] += s.w2[0] @ (torch.nn.functional.silu(s.w1[0] @ x[n]) * (s.w3[0] @ x[n]))
    return out


@pytest.mark.parametrize("top_k,shared", [(1, 0), (2, 0), (3, 1)])
def test_dropless_routes_every_token_and_matches_loop(top_k, shared):
    torch.manual_seed(top_k)
    block = MoE(16, 24, MoEConfig(num_experts=5, top_k=top_k, shared_experts=shared)).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y = block(x)
    idx, _, aux = block.router(x.reshape(-1, 16))
    assert aux["dropped"].item() == 0 and (idx < 5).all()
    assert torch.bincount(idx.reshape(-1), minlength=5).sum().item() == 26 * top_k
    torch.testing.assert_close(y.reshape(-1, 16), _naive_moe(block, x.reshape(-1, 16)), **TOL)
    # gradients reach router, every used expert and the input
    (y.square().sum() + block.aux_loss).backward()
    assert block.router.weight.grad.abs().sum() > 0 and block.experts.w1.grad.abs().sum() > 0


def test_capacity_drops_follow_priority_and_are_counted():
    # choice-major priority: all first choices (token order), then second choices
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    keep = capacity_drop(idx, 3, capacity=2)
    # expert 0: first choices of tokens 0, 1 kept; token 2's first choice dropped; token 3's 2nd dropped
    # expert 1: token 3's first choice, then token 0's second; token 1's second dropped
    assert keep.tolist() == [[True, True], [True, False], [False, True], [True, False]]


def test_capacity_mode_counts_drops_and_zeroes_dropped_tokens():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=1, capacity_factor=1.0)
    block = MoE(8, 16, cfg).double()
    with torch.no_grad():  # every token prefers expert 0: capacity ceil(1.0 * 8 * 1 / 4) = 2
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0
    x = torch.randn(8, 8, dtype=torch.float64).abs() + 0.1
    y = block(x)
    assert block.stats["dropped"].item() == 6
    assert (y[2:] == 0).all() and (y[:2] != 0).any()   # tokens 2..7 dropped: pass through as 0
    torch.testing.assert_close(y, _naive_moe(block, x), **TOL)


def test_aux_loss_is_collected_from_every_block():
    torch.manual_seed(0)
    model = torch.nn.ModuleList([MoE(8, 16, MoEConfig(num_experts=4)) for _ in range(2)]).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    for m in model:
        m(x)
    total = moe_aux_loss(model)
    torch.testing.assert_close(total, model[0].aux_loss + model[1].aux_loss, **TOL)
    assert moe_aux_loss(torch.nn.Linear(2, 2)) is None


def test_config_validation():
    from kiln.trainer.config import ConfigError, check_section  # ranges are checked there, once
    for bad in (dict(top_k=9), dict(num_experts=0), dict(every_n_layers=0), dict(capacity_factor=-1)):
        with pytest.raises(ConfigError, match="model.moe"):
            check_section(MoEConfig(**bad), "model.moe")
    assert [MoEConfig(every_n_layers=2).is_moe_layer(i) for i in range(4)] == [True, False, True, False]


def test_transformer_places_moe_blocks_and_objective_adds_aux_only_in_training():
    from kiln.model import matmul_params
    from kiln.model.transformer import SwiGLU, Transformer
    from kiln.trainer.objectives import CausalLM
    from kiln.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=4, n_heads=2, mlp="moe",
                      moe=MoEConfig(num_experts=4, top_k=2, every_n_layers=2, expert_ffn_dim=8))
    cfg.validate()
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    kinds = [type(layer.mlp) for layer in model.layers]
    assert kinds == [MoE, SwiGLU, MoE, SwiGLU] and cfg.moe_layers == 2
    dense = ModelConfig(vocab_size=64, dim=16, n_layers=4, n_heads=2)
    # two MoE layers swap a dense MLP (3*16*64) for the router (16*4) + top-2 experts (2*3*16*8)
    assert matmul_params(cfg) == matmul_params(dense) - 2 * 3 * 16 * 64 + 2 * (16 * 4 + 2 * 3 * 16 * 8)
    ids = torch.randint(0, 64, (2, 6))
    obj = CausalLM(model)
    ce = model.head(model(ids), labels=ids)
    train_loss = obj(ids, ids)
    torch.testing.assert_close(train_loss, ce + moe_aux_loss(model), **TOL)
    obj.eval()
    torch.testing.assert_close(obj(ids, ids), ce, **TOL)


def test_deferred_build_matches_full_build_expert_by_expert():
    """A model built with expert_device="meta" holds no routed-expert memory, leaves torch's generator
    where a full build does, has the same dense weights, and expert_init(e) gives the full rows."""
    from kiln.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, n_kv_heads=1, mlp="moe",
                      moe=MoEConfig(num_experts=4, top_k=2, shared_experts=1, every_n_layers=1))
    torch.manual_seed(5)
    full = Transformer(cfg)
    after_full = torch.randn(3)
    torch.manual_seed(5)
    lazy = Transformer(cfg, expert_device="meta")
    assert torch.equal(torch.randn(3), after_full)
    routed = [(n, p) for n, p in lazy.named_parameters() if ".experts." in n]
    assert len(routed) == 9 and all(p.is_meta for _, p in routed)
    full_params = dict(full.named_parameters())
    for n, p in lazy.named_parameters():
        if not p.is_meta:  # dense weights, routers, norms and the shared expert
            assert torch.equal(p, full_params[n]), n
    for block_full, block_lazy in zip(full.layers, lazy.layers):
        for e in range(4):
            for name, row in zip(("w1", "w3", "w2"), block_lazy.mlp.experts.expert_init(e)):
                assert torch.equal(row, getattr(block_full.mlp.experts, name)[e])
    # distinct experts and layers got distinct draws, at the Llama/NeoX scales
    w1 = torch.stack([b.mlp.experts.w1.detach() for b in full.layers])
    assert len({float(v) for v in w1[:, :, 0, 0].flatten()}) == 12
    assert abs(float(w1.std()) - 0.02) < 0.002
    assert abs(float(full.layers[0].mlp.experts.w2.detach().std()) - 0.02 / math.sqrt(6)) < 0.001
