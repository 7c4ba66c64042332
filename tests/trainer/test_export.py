"""`kiln export` and `kiln import-hf` end to end, on one SMALL run trained with ZeRO-3 on 2 ranks:
the fp32 file equals DeepSpeed's consolidation of the shards; the HF export passes the parity gate
(and says so) and loads in transformers with kiln's logits; import-hf of it writes a run that
`kiln train` continues, and exporting that run again gives the same tensors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import SMALL, kiln, losses


@pytest.fixture(scope="module")
def trained(kiln_home, tmp_path_factory):
    """(recipe path, run dir, work dir) of a SMALL run of 6 steps, ZeRO-3, 2 ranks."""
    work = tmp_path_factory.mktemp("export")
    recipe = work / "small.yaml"
    recipe.write_text(SMALL.replace("CACHE", str(kiln_home / "cache")).replace("RUNS", str(work / "runs")))
    kiln("train", recipe, "--set", "parallel.zero_stage=3", timeout=600)
    return recipe, work / "runs" / "small", work


@pytest.fixture(scope="module")
def hf_export(trained):
    _, run, work = trained
    res = kiln("export", run, "--format", "hf", "--out", work / "hf")
    return work / "hf", res


@pytest.mark.slow
def test_fp32_export_is_deepspeeds_consolidation(trained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, run, work = trained
    res = kiln("export", run, "--format", "fp32", "--out", work / "fp32")
    assert "DeepSpeed's consolidation of ZeRO stage 3" in res.stdout
    assert "the file read back equals the checkpoint's weights" in res.stdout
    got = load_file(str(work / "fp32" / "model.safetensors"))
    ckpt = run / "checkpoints"
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=(ckpt / "latest").read_text().strip())
    ref = {k.removeprefix("model."): v for k, v in ref.items()}
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k].float()) for k in ref)
    assert json.loads((work / "fp32" / "kiln_model.json").read_text())["dim"] == 64


@pytest.mark.slow
def test_hf_export_passes_the_gate_and_matches_kiln(trained, hf_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.infer.hf_export import read_fp32

    _, run, work = trained
    out, res = hf_export
    assert "as LlamaForCausalLM" in res.stdout
    assert "parity gate passed: LlamaForCausalLM" in res.stdout
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}
    # an independent look: transformers' own loader against the fp32 export's kiln model
    if not (work / "fp32").exists():
        kiln("export", run, "--format", "fp32", "--out", work / "fp32")
    model = read_fp32(work / "fp32")
    hf_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (model.logits(model(ids)) - hf_model(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"


@pytest.mark.slow
def test_import_then_train_then_export_round_trip(trained, hf_export):
    recipe, run, work = trained
    out, _ = hf_export
    imported = work / "runs" / "imported"
    res = kiln("import-hf", out, "--out", imported, "--recipe", recipe, "--set", "train.steps=2")
    assert "LlamaForCausalLM" in res.stdout and f"kiln train {imported / 'recipe.yaml'}" in res.stdout
    # exporting the imported (untrained) run gives back the tensors it was imported from
    again = kiln("export", imported, "--format", "hf", "--out", work / "hf_again")
    assert "parity gate passed" in again.stdout
    a, b = load_file(str(out / "model.safetensors")), load_file(str(work / "hf_again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # kiln train continues it: the same first batch has a lower loss than the run it came from had
    # at its first step (from random weights), as the imported weights are the trained ones
    kiln("train", imported / "recipe.yaml", timeout=600)
    first, orig = losses(imported), losses(run)
    assert sorted(first) == [1, 2]
    assert first[1] < orig[1] - 0.1, (first, orig)


@pytest.mark.slow
def test_expert_parallel_moe_exports_as_mixtral(trained, moe_ep_run):
    """An MoE run with its experts sharded over 2 expert-parallel ranks: the export reads every
    expert from kiln's expert files, the gate checks them, and each one on disk is the saved row."""
    from kiln.parallel.expert_state import read_full_experts

    _, _, work = trained
    run = moe_ep_run  # trained once for the session (tests/trainer/conftest.py)
    res = kiln("export", run, "--out", work / "hf_moe")
    assert "as MixtralForCausalLM" in res.stdout
    assert "parity gate passed: MixtralForCausalLM" in res.stdout and "8 experts' checksums" in res.stdout
    tag = (run / "checkpoints" / "latest").read_text().strip()
    saved = read_full_experts(run / "checkpoints" / tag)
    disk = load_file(str(work / "hf_moe" / "model.safetensors"))
    for layer in range(2):
        for e in range(4):
            for w in ("w1", "w3", "w2"):
                assert torch.equal(disk[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"],
                                   saved[w][layer][e].float())


@pytest.mark.slow
def test_user_errors_are_one_line(trained, hf_export, tmp_path):
    _, run, work = trained
    out, _ = hf_export
    cases = [
        (("export", tmp_path / "nowhere", "--out", tmp_path / "x"), "is neither a kiln run directory"),
        (("export", run, "--out", out), "exists and is not an empty folder"),
        (("import-hf", tmp_path, "--out", tmp_path / "r"), "has no config.json"),
        (("import-hf", out, "--out", run), "exists: name a new folder"),
    ]
    bad = tmp_path / "qwen"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                                 "hidden_size": 64, "num_attention_heads": 4}))
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    cases.append((("import-hf", bad, "--out", tmp_path / "r2"), "LlamaForCausalLM and MixtralForCausalLM "
                                                                 "checkpoints only"))
    # an MoE model Mixtral cannot express: a real (grown-kind) checkpoint of one, refused before
    # any weight is read
    from kiln.model import Transformer
    from kiln.trainer.config import load_recipe, to_dict
    from kiln.trainer.growth import write_grown_checkpoint
    from kiln.trainer.stage import resolve_model

    r = load_recipe(recipe := trained[0], ["model.mlp=moe", "model.moe.num_experts=4", "model.moe.shared_experts=1"])
    moe = Transformer(resolve_model(r, 512))
    write_grown_checkpoint(tmp_path / "moe", to_dict(r), moe.state_dict(), {"stage": 0, "step": 0}, (0, 0))
    cases.append((("export", tmp_path / "moe", "--out", tmp_path / "m"), "does not map onto Mixtral: shared experts"))
    for args, words in cases:
        res = kiln(*args, check=False)
        lines = [x for x in res.stderr.splitlines() if x.startswith("kiln: error:")]
        assert res.returncode == 2 and len(lines) == 1 and words in lines[0], (args, res.stderr[-500:])
    assert not (tmp_path / "r2").exists()


def _import(src, out, *sets):
    """kiln import-hf in this process (no data is prepared: it writes a recipe and weights)."""
    import argparse

    from kiln.trainer.commands import import_hf

    return import_hf.run(argparse.Namespace(dir=str(src), out=str(out), recipe=None, set=list(sets)))


def _grown_state(run_dir):
    from kiln.trainer.checkpoint import ckpt_root, latest_tag
    from kiln.trainer.growth import GROWN_FILE

    return torch.load(ckpt_root(run_dir) / latest_tag(run_dir) / GROWN_FILE, weights_only=True)


def test_import_of_a_mixtral_export_holds_its_tensors(tmp_path):
    import dataclasses

    import yaml

    from kiln.data.tokenizer import train_tokenizer
    from kiln.infer.hf_export import write_hf
    from kiln.model import ModelConfig, MoEConfig, Transformer

    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp="moe",
                      moe=MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.02), rope_theta=5e5)
    torch.manual_seed(0)
    model = Transformer(cfg)
    write_hf(model, train_tokenizer([json.__doc__ * 20], 300), tmp_path / "hf", 128)
    assert _import(tmp_path / "hf", tmp_path / "run", "train.steps=3", "model.moe.z_loss_coef=0") == 0
    state, want = _grown_state(tmp_path / "run"), model.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    recipe = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    moe = recipe["model"]["moe"]
    assert (recipe["model"]["mlp"], moe["num_experts"], moe["top_k"], moe["aux_loss_coef"], moe["z_loss_coef"]) == \
        ("moe", 4, 2, 0.02, 0)
    assert recipe["model"]["rope_theta"] == 5e5 and recipe["train"]["steps"] == 3
    assert recipe["data"]["tokenizer"] == str((tmp_path / "run" / "tokenizer.json").resolve())
    assert dataclasses.asdict(cfg)["moe"]["expert_ffn_dim"] == 0 and moe["expert_ffn_dim"] == cfg.hidden_dim


def test_import_adds_rows_for_kilns_special_tokens(tmp_path):
    """An HF tokenizer without kiln's <|endoftext|>, <|mask|>, <|pad|> (as Llama's): kiln adds the
    tokens, so the embedding grows to a multiple of 64 with mean rows; the old rows are kept."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from kiln.infer.hf_export import write_hf
    from kiln.model import ModelConfig, Transformer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([json.__doc__ * 20], trainers.BpeTrainer(
        vocab_size=320, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == 320
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=1, n_heads=4)
    torch.manual_seed(0)
    model = Transformer(cfg)
    write_hf(model, tok, tmp_path / "hf", 128)
    _import(tmp_path / "hf", tmp_path / "run")
    state = _grown_state(tmp_path / "run")
    for name in ("embed.weight", "head.weight"):
        w = model.state_dict()[name]
        assert state[name].shape == (384, 64)
        assert torch.equal(state[name][:320], w)
        assert torch.allclose(state[name][320:], w.mean(0).expand(64, -1))


def test_import_refuses_model_changes_and_damaged_files(tmp_path):
    from kiln.trainer.config import ConfigError

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(ConfigError, match="the model comes from .*config.json; only model.moe.aux_loss_coef"):
        _import(tmp_path / "hf", tmp_path / "run", "model.dim=128")
    with pytest.raises(ConfigError, match="model.safetensors cannot be read as safetensors"):
        _import(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()
