"""kiln.model.hf: the state-dict and config mapping to transformers' Llama / Mixtral and back.

The logits parity of the mapped weights (the real check) is tests/infer/test_hf_gate.py; here
the mapping itself: names and shapes against the model transformers builds from the config,
the inverse, and the one-line refusals.
"""
import dataclasses

import pytest
import torch

from kiln.model import ModelConfig, MoEConfig, Transformer
from kiln.model import hf

DENSE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
MOE = dataclasses.replace(DENSE, mlp="moe", moe=MoEConfig(num_experts=4, top_k=2), tie_embeddings=True)


def _state(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).state_dict()


@pytest.mark.parametrize("cfg", [DENSE, MOE, dataclasses.replace(DENSE, tie_embeddings=True, n_kv_heads=4)],
                         ids=["dense-gqa", "moe-tied", "dense-tied-mha"])
def test_to_hf_and_back_is_the_identity(cfg):
    state = _state(cfg)
    back = hf.from_hf_state(hf.to_hf_state(state, cfg), cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_wqkv_is_split_into_q_k_v_rows():
    state = _state(DENSE)
    out = hf.to_hf_state(state, DENSE)
    wqkv = state["layers.1.attn.wqkv.weight"]
    q, k, v = (out[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert q.shape == (64, 64) and k.shape == v.shape == (32, 64)  # 4 query heads, 2 kv heads of 16
    assert torch.equal(torch.cat([q, k, v]), wqkv)


def test_llama_names_and_shapes_are_the_ones_transformers_builds():
    from transformers import LlamaForCausalLM

    want = {k: v.shape for k, v in LlamaForCausalLM(hf.hf_config(DENSE)).state_dict().items()}
    got = {k: v.shape for k, v in hf.to_hf_state(_state(DENSE), DENSE).items()}
    assert got == want


def test_tied_embeddings_write_no_lm_head():
    cfg = dataclasses.replace(DENSE, tie_embeddings=True)
    out = hf.to_hf_state(_state(cfg), cfg)
    assert "lm_head.weight" not in out and hf.hf_config(cfg).tie_word_embeddings


def test_mixtral_experts_on_disk_one_tensor_each():
    out = hf.to_hf_state(_state(MOE), MOE)
    for i in range(2):
        assert sum(k.startswith(f"model.layers.{i}.block_sparse_moe.experts.") for k in out) == 4 * 3
        assert out[f"model.layers.{i}.block_sparse_moe.gate.weight"].shape == (4, 64)


def test_transformers_5_fused_experts_read_back():
    """A Mixtral state dict as transformers 5 holds it in memory (gate_up_proj, down_proj) maps to
    the same kiln tensors as the per-expert file layout."""
    state = _state(MOE)
    disk = hf.to_hf_state(state, MOE)
    fused = {k: v for k, v in disk.items() if ".experts." not in k}
    for i in range(2):
        h = f"model.layers.{i}."
        fused[h + "mlp.gate.weight"] = fused.pop(h + "block_sparse_moe.gate.weight")
        fused[h + "mlp.experts.gate_up_proj"] = torch.cat([state[f"layers.{i}.mlp.experts.w1"],
                                                           state[f"layers.{i}.mlp.experts.w3"]], dim=1)
        fused[h + "mlp.experts.down_proj"] = state[f"layers.{i}.mlp.experts.w2"]
    back = hf.from_hf_state(fused, MOE)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_a_dropped_expert_is_refused_by_name():
    disk = hf.to_hf_state(_state(MOE), MOE)
    del disk["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(hf.Unmappable, match="holds 3 of layer 1's 4 experts' w2"):
        hf.from_hf_state(disk, MOE)


@pytest.mark.parametrize("cfg", [DENSE, MOE, dataclasses.replace(DENSE, rope_theta=500000.0, norm_eps=1e-6)],
                         ids=["dense", "moe", "theta-eps"])
def test_config_round_trips_through_config_json(cfg):
    c = hf.hf_config(cfg, 128, 0, 2).to_dict()
    back = hf.model_config_from_hf(c)
    assert hf.architecture(back) == hf.architecture(cfg)
    for f in ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "head_dim", "rope_theta", "norm_eps",
              "tie_embeddings", "mlp"):
        assert getattr(back, f) == getattr(cfg, f), f
    if cfg.mlp == "moe":
        assert (back.moe.num_experts, back.moe.top_k, back.moe.expert_ffn_dim or back.hidden_dim) == \
            (cfg.moe.num_experts, cfg.moe.top_k, cfg.hidden_dim)
    else:
        assert back.hidden_dim == cfg.hidden_dim


@pytest.mark.parametrize("moe, words", [
    (MoEConfig(num_experts=4, shared_experts=1), "shared experts (model.moe.shared_experts=1)"),
    (MoEConfig(num_experts=4, every_n_layers=2), "dense layers between MoE layers (model.moe.every_n_layers=2)"),
    (MoEConfig(num_experts=4, capacity_factor=1.25), "capacity limit that drops tokens"),
    (MoEConfig(num_experts=4, top_k=1), "top_k=1"),
    (MoEConfig(num_experts=4, renormalize=False), "model.moe.renormalize=false"),
])
def test_unmappable_moe_is_one_line(moe, words):
    with pytest.raises(hf.Unmappable) as e:
        hf.architecture(dataclasses.replace(MOE, moe=moe))
    assert words in str(e.value) and "\n" not in str(e.value) and "Mixtral" in str(e.value)


def test_encoder_is_refused():
    with pytest.raises(hf.Unmappable, match="bidirectional encoder"):
        hf.architecture(dataclasses.replace(DENSE, causal=False))


@pytest.mark.parametrize("change, words", [
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act=gelu"),
    ({"attention_bias": True}, "bias terms"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling 'llama3'"),
    ({"head_dim": 32}, "head_dim=32"),
])
def test_unsupported_hf_configs_are_one_line(change, words):
    c = {**hf.hf_config(DENSE).to_dict(), **change}
    with pytest.raises(hf.Unmappable) as e:
        hf.model_config_from_hf(c)
    assert words in str(e.value) and "\n" not in str(e.value)
