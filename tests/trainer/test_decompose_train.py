"""`kiln train` with data.packing=decompose through the real CLI on the embedded corpus: variable
batches with constant tokens, the schedule keyed to tokens, per-step bucket metrics, exact
resume, and sequence parallelism for long buckets only, matching the single-rank run."""
import shutil

import pytest

from kiln.trainer.optim import lr_lambda
from tests.trainer.conftest import kiln, losses, metrics

pytestmark = pytest.mark.slow

T = 1024
DECOMPOSE = ["--set", "data.packing=decompose", "--set", "data.buckets=[5, 8]", "--set", "data.num_cycles=2",
       "--set", f"train.tokens_per_step={T}", "--set", "checkpoint.every=4", "--set", "train.steps=8"]


def test_decompose_run_constant_tokens_metrics_and_exact_resume(small_recipe, tmp_path):
    res = kiln("train", small_recipe, *DECOMPOSE, "--set", "train.name=decompose")
    assert "decomposed into buckets 2^5..2^8" in res.stderr or "reusing" in res.stderr
    run = tmp_path / "runs" / "decompose"
    recs = metrics(run)
    steps = [r for r in recs if "data/bucket" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert 5 <= r["data/bucket"] <= 8 and r["data/seq_len"] == 2 ** r["data/bucket"]
        assert r["data/batch_size"] * r["data/seq_len"] == T  # constant tokens, variable batch
        assert r["data/attn_flops"] > 0 and r["data/sp"] is False
    assert len({r["data/bucket"] for r in steps}) > 1
    train = [r for r in recs if "train/loss" in r]
    for r in train:  # tokens = step x tokens_per_step, and the schedule's progress is tokens / budget
        assert r["train/tokens"] == r["step"] * T
        want = 0.003 * lr_lambda(r["step"], 2, 8, "cosine", 0.1)
        assert abs(r["train/lr"] - want) < 1e-12, (r["step"], r["train/lr"], want)
    assert any(k.startswith("data/tokens_per_s_b") for r in recs for k in r)
    assert any("eval/loss" in r for r in recs)
    ref = losses(run)

    # a crash right after step 4's checkpoint: the resumed run redoes steps 5..8 exactly
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    res = kiln("train", small_recipe, *DECOMPOSE, "--set", "train.name=decompose")
    assert "resuming" in res.stdout
    assert losses(run) == ref
    assert [r["data/bucket"] for r in metrics(run) if "data/bucket" in r] == [r["data/bucket"] for r in steps]


def test_long_buckets_sequence_parallel_follow_the_single_rank_run(small_recipe, tmp_path):
    kiln("train", small_recipe, *DECOMPOSE, "--nproc", "1", "--set", "train.name=one")
    ref = losses(tmp_path / "runs" / "one")
    kiln("train", small_recipe, *DECOMPOSE, "--set", "parallel.sp=2", "--set", "parallel.sp_min_len=128",
         "--set", "train.name=sp")
    recs = metrics(tmp_path / "runs" / "sp")
    got = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}
    assert sorted(got) == sorted(ref)
    for step in ref:  # fp32 over 8 optimizer steps
        assert abs(got[step] - ref[step]) < 1e-4 * ref[step], (step, got[step], ref[step])
    modes = {(r["data/seq_len"] >= 128, r["data/sp"]) for r in recs if "data/bucket" in r}
    assert modes == {(True, True), (False, False)}  # long buckets on the ring, short ones not


def test_layout_errors_are_one_line(small_recipe):
    res = kiln("config", small_recipe, "--set", "data.packing=decompose", "--set", "data.buckets=[5, 8]",
               "--set", "train.tokens_per_step=300", check=False)
    assert res.returncode == 2 and "make it a multiple of 512" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = kiln("config", small_recipe, "--set", "parallel.sp_min_len=512", check=False)
    assert res.returncode == 2 and "applies to data.packing=decompose" in res.stderr
