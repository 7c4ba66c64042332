"""`kiln train` with objective.name=meap through the real CLI: the realised mask rate is logged,
the run is scored by `kiln eval --task kv_retrieval`, and a sequence-parallel run follows the
single-rank one (the masks are drawn on the whole batch before sharding)."""
import json

import pytest

from tests.trainer.conftest import kiln, losses, metrics

pytestmark = pytest.mark.slow

MEAP = ["--set", "objective.name=meap", "--set", "objective.meap.mask_ratio=0.2"]


def test_meap_run_with_needles_logs_its_mask_rate_and_is_scored_on_kv_retrieval(small_recipe, tmp_path):
    kiln("train", small_recipe, *MEAP, "--set", "data.synthetic_needles=0.2", "--set", "train.name=meap")
    run = tmp_path / "runs" / "meap"
    train = [r for r in metrics(run) if "train/loss" in r]
    assert len(train) == 6
    for r in train:  # 2 ranks x 4 x 64 positions per step: the mean is 0.2 +- 0.02 (1 sd)
        assert abs(r["objective/mask_rate"] - 0.2) < 0.1, r
    assert len({r["objective/mask_rate"] for r in train}) > 1  # fresh masks every step
    out = tmp_path / "kv.json"
    res = kiln("eval", run, "--task", "kv_retrieval", "--lengths", "64", "--depths", "0,1", "--samples", "3",
               "--metrics-out", out)
    assert "kv_retrieval accuracy" in res.stdout
    got = json.loads(out.read_text())
    assert got["lengths"] == [64] and got["depths"] == [0.0, 1.0] and len(got["grid"][0]) == 2
    assert all(0 <= v <= 1 for v in got["grid"][0]) and got["samples"] == 3


def test_meap_sequence_parallel_run_follows_the_single_rank_run(small_recipe, tmp_path):
    # one data-parallel replica: SP=2 ranks draw the same masks as the single rank (seeded by the
    # data-parallel rank, drawn before sharding), so the losses agree to fp32 ring-attention noise
    kiln("train", small_recipe, *MEAP, "--nproc", "1", "--set", "train.name=sp1")
    kiln("train", small_recipe, *MEAP, "--set", "parallel.sp=2", "--set", "train.name=sp2")
    ref, got = losses(tmp_path / "runs" / "sp1"), losses(tmp_path / "runs" / "sp2")
    assert sorted(got) == sorted(ref)
    for step in ref:  # the tolerance of the CLM test (tests/trainer/test_train.py)
        assert abs(got[step] - ref[step]) < 1e-4 * ref[step], (step, got[step], ref[step])
    rates = [[r["objective/mask_rate"] for r in metrics(tmp_path / "runs" / n) if "train/loss" in r] for n in ("sp1", "sp2")]
    assert rates[0] == rates[1]


def test_meap_sft_trains_on_response_labels_and_masked_copies(small_recipe, tmp_path, capsys):
    """objective.meap.sft on a prompt/response jsonl: each step trains the rows and their masked
    copies (twice the FLOPs per input token), masking ~10% of response inputs; a recipe without
    the file is one line."""
    from kiln.model import ModelConfig, flops_per_token
    from kiln.trainer.cli import main

    pairs = tmp_path / "sft.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"def add_{i}(x):\n", "response": f"    return x + {i}\n" * 4})
                             + "\n" for i in range(40)))
    sft = ["--set", "objective.name=meap", "--set", "objective.meap.sft=true", "--set", "train.steps=3",
           "--set", "checkpoint.every=3", "--set", "train.name=sft"]
    assert main(["train", str(small_recipe), *sft]) == 2
    assert "objective.meap.sft needs data.sft_file" in capsys.readouterr().err
    kiln("train", small_recipe, *sft, "--set", f"data.sft_file={pairs}")
    train = [r for r in metrics(tmp_path / "runs" / "sft") if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(0 < r["train/loss"] < 7 for r in train)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    for r in train:  # 2 ranks x 4 rows x 64 tokens per step; each row also trains as its masked copy
        assert r["train/tokens"] == r["step"] * 512
        assert r["train/flops"] == pytest.approx(r["train/tokens"] * 2 * flops_per_token(cfg, 64), rel=1e-12)
        assert 0.03 < r["objective/mask_rate"] < 0.2  # 10% of the response positions
