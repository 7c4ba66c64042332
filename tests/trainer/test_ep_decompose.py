"""Expert parallelism together with dataset decomposition through the real CLI: a 4-rank gloo MoE
run (EP=4, one expert per rank) on decomposition buckets, whose steps carry 1..8 rows per rank,
resumes from a mid-run checkpoint bitwise equal to the uninterrupted run (losses, buckets, held-out
loss per bucket), and its experts really are spread over the ranks."""
import shutil

import pytest

from tests.trainer.conftest import kiln, losses, metrics

pytestmark = pytest.mark.slow

T = 1024
EP_DECOMPOSE = ["--set", "train.nproc=4", "--set", "data.packing=decompose", "--set", "data.buckets=[5, 8]",
                "--set", "data.num_cycles=2", "--set", f"train.tokens_per_step={T}", "--set", "train.steps=6",
                "--set", "checkpoint.every=3", "--set", "model.mlp=moe", "--set", "model.moe.num_experts=4",
                "--set", "model.moe.top_k=2", "--set", "parallel.ep=4", "--set", "parallel.profile_every=0",
                "--set", "train.eval_every=3", "--set", "train.name=epdec"]


def _eval(recs):
    return [{k: v for k, v in r.items() if k.startswith("eval/loss")} for r in recs
            if any(k.startswith("eval/loss") for k in r)]


def test_ep4_on_buckets_resumes_exactly(small_recipe, tmp_path):
    kiln("train", small_recipe, *EP_DECOMPOSE, timeout=900)
    run = tmp_path / "runs" / "epdec"
    recs = metrics(run)
    ref, ref_eval = losses(run), _eval(recs)
    buckets = [r["data/bucket"] for r in recs if "data/bucket" in r]
    assert sorted(ref) == list(range(1, 7)) and len(set(buckets)) > 1
    assert any(r.get("moe/a2a_bytes_per_step", 0) > 0 for r in recs)  # experts really are remote
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000006").glob("experts_ep*.pt")) == \
        [f"experts_ep{r}.pt" for r in range(4)]
    assert len([e for e in ref_eval if "eval/loss_b8" in e]) == 2  # steps 3 and 6, every bucket

    # a crash right after step 3's checkpoint: steps 4..6 again, bitwise as before
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "checkpoints" / "latest").write_text("step_00000003")
    res = kiln("train", small_recipe, *EP_DECOMPOSE, timeout=900)
    assert "resuming" in res.stdout
    recs = metrics(run)
    assert losses(run) == ref
    assert [r["data/bucket"] for r in recs if "data/bucket" in r] == buckets
    assert _eval(recs) == ref_eval
