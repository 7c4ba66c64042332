"""`kiln train` with data.packing=decompose through the real CLI on the embedded corpus: variable
batches with constant tokens, the schedule keyed to tokens, per-step bucket metrics, held-out
loss per bucket (against the checkpoint), exact resume, and sequence parallelism for long buckets only, matching the single-rank run."""
import shutil
from pathlib import Path

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
    check_bucket_eval(run, recs)
    ref = losses(run)

    # a crash right after step 4's checkpoint: the resumed run redoes steps 5..8 exactly
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    res = kiln("train", small_recipe, *DECOMPOSE, "--set", "train.name=decompose")
    assert "resuming" in res.stdout
    assert losses(run) == ref
    assert [r["data/bucket"] for r in metrics(run) if "data/bucket" in r] == [r["data/bucket"] for r in steps]


def check_bucket_eval(run, recs):
    """eval/loss_b{k} of every bucket equals the checkpoint's loss on that bucket's held-out
    batches computed in this process, and eval/loss is their mean weighted by held-out tokens."""
    import json

    from kiln.data.decompose import Decomposed, bucket_dir
    from kiln.data.decompose_loader import DecomposeHeldOut
    from kiln.infer.evaluate import heldout_loss
    from kiln.trainer.commands.common import open_checkpoint

    per_bucket = [r for r in recs if "eval/buckets" in r]
    assert [r["step"] for r in per_bucket] == [8]
    got = {int(k[len("eval/loss_b"):]): v for k, v in per_bucket[0].items() if k.startswith("eval/loss_b")}
    assert sorted(got) == [5, 6, 7, 8] and per_bucket[0]["eval/buckets"] == 4
    ckpt = open_checkpoint(run)
    dec = Decomposed.load(bucket_dir(ckpt.data.dir, (5, 8), 0))
    tokens = {b["log2"]: b["tokens"] for b in json.loads((Path(dec.dir) / "summary.json").read_text())
              ["splits"]["valid"]["buckets"]}
    overall = [r["eval/loss"] for r in recs if "eval/loss" in r and r["step"] == 8]
    want = sum(tokens[k] * got[k] for k in got) / sum(tokens[k] for k in got)
    assert overall == [pytest.approx(want, rel=1e-12)]
    held = DecomposeHeldOut({k: dec.prefix("valid", k) for k in dec.buckets}, T, 0, 1)  # one rank, all rows
    model = ckpt.model()
    for k in got:  # fp32, the same rows split over 2 ranks in the run
        batches = [b for b in held.eval_batches(1) if b.tag == k]
        assert abs(heldout_loss(model, batches)["loss"] - got[k]) < 1e-5 * got[k], k


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
