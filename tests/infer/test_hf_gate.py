"""The HF export and its parity gate on tiny random kiln models (dim 64, 2 layers, vocab 512):
the export loads in transformers and gives kiln's logits (fp32 max-abs <= 1e-4, KL <= 1e-6), and
each kind of broken export fails by name: a corrupted block, dropped or swapped experts, another
tokenizer."""
import dataclasses
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.data.tokenizer import train_tokenizer
from kiln.infer import hf_gate
from kiln.infer.hf_export import read_fp32, rounded, write_fp32, write_hf
from kiln.model import ModelConfig, MoEConfig, Transformer
from kiln.model import hf

DENSE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
MOE = dataclasses.replace(DENSE, mlp="moe", moe=MoEConfig(num_experts=4, top_k=2), tie_embeddings=True)


def _texts():
    """Real text without a download: the source of two standard-library modules."""
    return [inspect.getsource(json), inspect.getsource(dataclasses)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_texts(), 400)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _texts_to_check():
    return [t[:2000] for t in _texts()] + ["caf\u00e9 \u65e5\u672c\u8a9e \U0001f600\ttabs  and\n\nlines"]


@pytest.mark.parametrize("cfg", [DENSE, MOE, dataclasses.replace(DENSE, rope_theta=5e5, norm_eps=1e-6, n_kv_heads=1,
                                                                 tie_embeddings=True)],
                         ids=["llama", "mixtral", "llama-theta-mqa-tied"])
def test_export_passes_the_gate(cfg, tok, tmp_path):
    model = _model(cfg)
    written = write_hf(model, tok, tmp_path / "hf", 128)
    assert written["architecture"] == hf.architecture(cfg)
    r = hf_gate.run_gate(model, tmp_path / "hf", tok, _texts_to_check())
    assert r.ok, r.line()
    assert r.max_abs <= 1e-4 and r.kl <= 1e-6
    assert r.texts_checked == 3
    assert r.experts_checked == (8 if cfg.mlp == "moe" else 0)  # 2 layers x 4 experts
    assert r.line().startswith(f"parity gate passed: {written['architecture']}")


def _rewrite(path, change):
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("layer", [0, 1])
def test_a_corrupted_block_is_named(layer, tok, tmp_path):
    model = _model(DENSE)
    write_hf(model, tok, tmp_path / "hf", 128)

    def corrupt(s):
        w = s[f"model.layers.{layer}.self_attn.o_proj.weight"]
        s[f"model.layers.{layer}.self_attn.o_proj.weight"] = w + 0.05 * torch.randn(w.shape)

    _rewrite(tmp_path / "hf" / "model.safetensors", corrupt)
    r = hf_gate.run_gate(model, tmp_path / "hf", tok, _texts_to_check())
    assert not r.ok and r.first_divergent == f"block {layer}"
    assert f"hidden states first diverge at block {layer}" in r.line()
    assert f"1 tensors differ after loading in transformers, first ['layers.{layer}.attn.wo.weight']" in r.line()


def test_a_corrupted_embedding_is_named(tok, tmp_path):
    model = _model(DENSE)
    write_hf(model, tok, tmp_path / "hf", 128)
    _rewrite(tmp_path / "hf" / "model.safetensors",
             lambda s: s["model.embed_tokens.weight"].mul_(1.5))
    r = hf_gate.run_gate(model, tmp_path / "hf", tok, _texts_to_check())
    assert not r.ok and r.first_divergent == "the token embedding"


def test_dropped_experts_fail_by_count_and_checksum(tok, tmp_path):
    """A converter that drops an expert's weights: the gate names the layer, the count and the
    missing expert (transformers 5 refuses such a file; older versions filled it at random)."""
    model = _model(MOE)
    write_hf(model, tok, tmp_path / "hf", 128)

    def drop(s):
        for w in ("w1", "w3", "w2"):
            del s[f"model.layers.1.block_sparse_moe.experts.2.{w}.weight"]

    _rewrite(tmp_path / "hf" / "model.safetensors", drop)
    r = hf_gate.run_gate(model, tmp_path / "hf", tok, _texts_to_check())
    assert not r.ok
    assert "layer 1 has 3 experts on disk, kiln has 4" in r.line()
    assert "experts on disk: the checkpoint holds 3 of layer 1's 4 experts' w1 weights" in r.line()
    assert "transformers cannot load it" in r.line() or "weights missing from the files at random" in r.line()


def test_swapped_experts_fail_the_checksums(tok, tmp_path):
    model = _model(MOE)
    write_hf(model, tok, tmp_path / "hf", 128)

    def swap(s):
        for w in ("w1", "w3", "w2"):
            a, b = (f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in (0, 3))
            s[a], s[b] = s[b], s[a]

    _rewrite(tmp_path / "hf" / "model.safetensors", swap)
    r = hf_gate.run_gate(model, tmp_path / "hf", tok, _texts_to_check())
    assert not r.ok
    assert "2 experts' checksums differ on disk, first (layer, expert) [(0, 0), (0, 3)]" in r.line()
    assert "2 experts' checksums differ in transformers" in r.line()


def test_another_tokenizer_fails(tok, tmp_path):
    model = _model(DENSE)
    write_hf(model, train_tokenizer(_texts()[:1], 300), tmp_path / "hf", 128)
    r = hf_gate.run_gate(model, tmp_path / "hf", tok, _texts_to_check())
    assert not r.ok and "AutoTokenizer's ids differ from kiln's on text 0" in r.line()


def test_tokenizer_config_names_eos_and_pad(tok, tmp_path):
    from transformers import AutoTokenizer

    write_hf(_model(DENSE), tok, tmp_path / "hf", 128)
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (auto.eos_token_id, auto.pad_token_id) == (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>"))
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == auto.eos_token_id


def test_unmappable_model_writes_nothing(tok, tmp_path):
    model = _model(dataclasses.replace(MOE, moe=MoEConfig(num_experts=4, shared_experts=1)))
    with pytest.raises(hf.Unmappable, match="shared experts"):
        write_hf(model, tok, tmp_path / "hf", 128)
    assert not (tmp_path / "hf").exists()


def test_fp32_file_rebuilds_the_model(tmp_path):
    model = _model(MOE)
    write_fp32(model, tmp_path / "fp32")
    back = read_fp32(tmp_path / "fp32")
    assert back.cfg == model.cfg
    want = model.state_dict()
    assert back.state_dict().keys() == want.keys() and all(torch.equal(back.state_dict()[k], want[k]) for k in want)


def test_bfloat16_export_matches_the_rounded_model(tok, tmp_path):
    """A bf16 export computes kiln's model with bf16-rounded weights: the gate compares against that
    (and would name the rounding as differing tensors against the fp32 model)."""
    model = _model(MOE)
    write_hf(model, tok, tmp_path / "hf", 128, "bfloat16")
    assert load_file(str(tmp_path / "hf" / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    r = hf_gate.run_gate(rounded(model, "bfloat16"), tmp_path / "hf", tok, _texts_to_check())
    assert r.ok, r.line()
    r = hf_gate.run_gate(model, tmp_path / "hf", tok, _texts_to_check())
    assert not r.ok and "tensors differ after loading in transformers" in r.line()
