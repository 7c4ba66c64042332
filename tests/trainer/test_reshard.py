"""Resharding on resume (issue #19, item 3): a ZeRO-0 run saved by 2 ranks resumes on 1, and one
saved by 1 resumes on 2, with train.global_batch fixed (kiln derives grad_accum from the rank
count), taking exactly the samples the unchanged run takes, and the loss stays within 1e-5
(relative) of the unchanged run (the sums are reduced in another order, so not bitwise). ZeRO 1-3
partition the optimizer by data-parallel rank: resuming those on another count is refused in
one line (docs/reliability.md says why DeepSpeed's universal checkpoint is not used)."""
import numpy as np
import pytest

from tests.trainer.conftest import kiln, losses, metrics

# 8 sequences a step whatever the rank count: 1 rank x 2 micro-steps or 2 ranks x 1
BATCH = ["--set", "train.compile=off", "--set", "train.global_batch=8", "--set", "train.micro_batch=4",
         "--set", "checkpoint.every=3", "--set", "schedule.decay=constant"]


def test_the_global_batch_is_the_same_samples_at_any_rank_count(tmp_path):
    """No sample repeated or skipped: the samples of a step over all ranks and micro-steps are the
    same for 2 ranks x 1 micro-step and 1 rank x 2 (the stream is indexed by step, not by rank)."""
    from kiln.data.indexed import IndexWriter
    from kiln.data.loader import ChunkLoader

    prefix = str(tmp_path / "d")
    w = IndexWriter(prefix, np.uint16)
    for i in range(40):
        w.add(np.arange(i, i + 30, dtype=np.uint16))
    w.finalize()
    two = [ChunkLoader(prefix, 16, 4, r, 2, seed=3, grad_accum=1) for r in range(2)]
    one = ChunkLoader(prefix, 16, 4, 0, 1, seed=3, grad_accum=2)
    for step in range(12):
        a = np.concatenate([two[r].local_samples(step, 0) for r in range(2)])
        c = np.concatenate([one.local_samples(step, m) for m in range(2)])
        assert a.tolist() == c.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_rank_count(small_recipe, tmp_path, before, after):
    kiln("train", small_recipe, *BATCH, "--set", "train.steps=6", "--set", f"train.nproc={before}",
         "--set", "train.name=straight")
    ref = losses(tmp_path / "runs" / "straight")
    run = tmp_path / "runs" / "moved"
    kiln("train", small_recipe, *BATCH, "--set", "train.steps=3", "--set", f"train.nproc={before}",
         "--set", "train.name=moved")
    res = kiln("train", small_recipe, *BATCH, "--set", "train.steps=6", "--set", f"train.nproc={after}",
               "--set", "train.name=moved")
    assert f"{after} rank" in res.stdout and "steps 3->6" in res.stdout
    got = losses(run)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])
    tokens = {r["step"]: r["train/tokens"] for r in metrics(run) if "train/tokens" in r}
    ref_tokens = {r["step"]: r["train/tokens"] for r in metrics(tmp_path / "runs" / "straight") if "train/tokens" in r}
    assert tokens == ref_tokens  # the same samples: nothing repeated or skipped


@pytest.mark.slow
def test_zero_partitions_on_another_rank_count_are_refused(small_recipe, tmp_path):
    z1 = [*BATCH, "--set", "parallel.zero_stage=1", "--set", "train.name=z1"]
    kiln("train", small_recipe, *z1, "--set", "train.steps=3")
    res = kiln("train", small_recipe, *z1, "--set", "train.steps=6", "--set", "train.nproc=1", check=False)
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if "error" in x.lower()]  # progress lines may precede the one error line
    assert errors == [lines[-1]] and "ZeRO optimizer partitions of 2 data-parallel ranks" in lines[-1], res.stderr
