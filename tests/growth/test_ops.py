"""Growth operators against their definitions: stack copies layer i mod L (MoE included), zero
keeps the function, upcycle keeps the dense function with exact copies; bad inputs raise."""
import dataclasses

import pytest
import torch

from kiln.growth.ops import grow, stack, upcycle, zero
from kiln.model import ModelConfig, MoEConfig, Transformer

DENSE = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)
MOE = dataclasses.replace(DENSE, mlp="moe", moe=MoEConfig(num_experts=4, top_k=2, shared_experts=1,
                                                          every_n_layers=2))


def built(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).double()


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_stack_layer_i_is_small_layer_i_mod_L_and_the_model_runs(cfg):
    small = built(cfg)
    state, big_cfg = stack(small.state_dict(), cfg, 4)
    assert big_cfg == dataclasses.replace(cfg, n_layers=8)
    big = Transformer(big_cfg).double()
    assert set(big.state_dict()) == set(state)  # a valid model of the target configuration
    big.load_state_dict(state)
    sd = small.state_dict()
    for name, t in big.state_dict().items():
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            assert torch.equal(t, sd[f"layers.{int(i) % 2}.{rest}"]), name
        else:  # embeddings, final norm, head: verbatim
            assert torch.equal(t, sd[name]), name
    if cfg.mlp == "moe":
        assert any(".mlp.experts.w1" in n for n in state) and any(".mlp.router." in n for n in state)
    x = torch.randint(0, 64, (2, 9))
    assert torch.isfinite(big.logits(big(x))).all()


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_zero_computes_the_small_models_function(cfg):
    small = built(cfg).eval()
    state, big_cfg = zero(small.state_dict(), cfg, 3)
    big = Transformer(big_cfg).double().eval()
    big.load_state_dict(state)
    x = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(big.logits(big(x)), small.logits(small(x)), rtol=1e-12, atol=1e-12)
    # and only the new layers' output projections are zero
    zeros = {n for n, t in state.items() if not t.any()}
    assert zeros and all(int(n.split(".")[1]) >= 2 for n in zeros)


def test_upcycle_keeps_the_dense_function_with_exact_copies_and_noise_breaks_symmetry():
    large = dataclasses.replace(DENSE, mlp="moe", moe=MoEConfig(num_experts=4, top_k=2))
    small = built(DENSE).eval()
    state = grow("upcycle", small.state_dict(), DENSE, large, 4, seed=3)
    moe = Transformer(large).double().eval()
    moe.load_state_dict(state)
    x = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(moe.logits(moe(x)), small.logits(small(x)), rtol=1e-10, atol=1e-10)
    noisy = upcycle(small.state_dict(), DENSE, large, seed=3, noise=0.1)[0]
    w = noisy["layers.0.mlp.experts.w1"]
    assert not torch.equal(w[0], w[1])
    dense_std = float(small.state_dict()["layers.0.mlp.w1.weight"].std())
    assert float((w[0] - state["layers.0.mlp.experts.w1"][0]).std()) == pytest.approx(0.1 * dense_std, rel=0.2)


def test_bad_growth_requests_raise_one_line():
    sd = built(DENSE).state_dict()
    for bad, match in ((lambda: stack(sd, DENSE, 1), "factor must be >= 2"),
                       (lambda: grow("stack", sd, DENSE, dataclasses.replace(DENSE, n_layers=6), 4),
                        "gives 8, but the large model has 6"),
                       (lambda: stack(built(dataclasses.replace(MOE, n_layers=3)).state_dict(),
                                      dataclasses.replace(MOE, n_layers=3), 2), "every_n_layers"),
                       (lambda: upcycle(sd, DENSE, dataclasses.replace(MOE, moe=MoEConfig(expert_ffn_dim=8))),
                        "expert_ffn_dim")):
        with pytest.raises(ValueError, match=match) as e:
            bad()
        assert "\n" not in str(e.value)
