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
