"""`kiln train` with objective.name=electra (and mlm) through the real CLI on 2 gloo ranks: the
window logs ELECTRA's three diagnostics, a ZeRO-2 run resumed from its middle checkpoint
follows the uninterrupted run bitwise with both models restored, and `kiln eval` reads the
discriminator alone."""
import json
import shutil

import pytest
import torch

from tests.trainer.conftest import kiln, metrics

pytestmark = pytest.mark.slow

ENCODER = ["--set", "model.causal=false", "--set", "train.eval_every=3"]
ELECTRA = [*ENCODER, "--set", "objective.name=electra"]


def _train(run) -> list[dict]:
    """The run's training records (the loss under train/loss, or loss in the older layout)."""
    return [r for r in metrics(run) if "train/loss" in r or "loss" in r]


def losses(run) -> dict:
    return {r["step"]: r.get("train/loss", r.get("loss")) for r in _train(run)}


def _state(run, step, part, zero=2):
    from kiln.infer.load import checkpoint_state

    return checkpoint_state(run / "checkpoints" / f"step_{step:08d}", None, zero, part=part)


def test_electra_zero2_resume_restores_both_models_exactly(small_recipe, tmp_path):
    args = [*ELECTRA, "--set", "parallel.zero_stage=2"]
    kiln("train", small_recipe, *args, "--set", "train.name=straight")
    straight = tmp_path / "runs" / "straight"
    recs = _train(straight)
    assert len(recs) == 6
    for r in recs:
        for k in ("objective/gen_mlm_acc", "objective/disc_acc", "objective/replaced_frac"):
            assert 0 <= r[k] <= 1, (k, r)
        assert r["objective/replaced_frac"] <= r["objective/mask_rate"] + 1e-9  # only masked tokens change
    assert [r for r in metrics(straight) if "eval/loss" in r]

    # the same run, interrupted after its step-3 checkpoint: a copy without what came after
    resumed = tmp_path / "runs" / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    (resumed / "metrics.jsonl").write_text("")
    res = kiln("train", small_recipe, *args, "--set", "train.name=resumed")
    assert "resuming" in res.stdout
    ref, got = losses(straight), losses(resumed)
    assert {s: got[s] for s in (4, 5, 6)} == {s: ref[s] for s in (4, 5, 6)}  # bitwise, step for step
    for part in ("model", "gen", "rtd"):  # the discriminator, the generator and its head, exactly
        a, b = _state(straight, 6, part), _state(resumed, 6, part)
        assert a.keys() == b.keys() and a
        assert part != "model" or "head.weight" in a  # the frozen LM head is saved too (kiln eval loads it)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_eval_reads_the_discriminator_alone(small_recipe, tmp_path):
    # under ZeRO-3 (partitioned weights, no mp_rank_00 file: the loader consolidates them)
    kiln("train", small_recipe, *ELECTRA, "--set", "train.name=el", "--set", "train.steps=3",
         "--set", "parallel.zero_stage=3")
    run = tmp_path / "runs" / "el"
    state = _state(run, 3, "model", zero=3)
    assert not any(k.startswith(("gen.", "rtd.")) for k in state)
    assert "embed.weight" in state and "gen.proj_in.weight" not in state
    assert "proj_in.weight" in _state(run, 3, "gen", zero=3)
    out = tmp_path / "probe.json"
    res = kiln("eval", run, "--task", "probe", "--per-class", "8", "--classes", "3", "--snippet-len", "32",
               "--metrics-out", out)
    assert "probe accuracy" in res.stdout
    got = json.loads(out.read_text())
    assert 0 <= got["accuracy"] <= 1 and got["chance"] == 1 / 3 and got["heldout_snippets"] == 12
    res = kiln("eval", run, check=False)  # an encoder has no next-token perplexity
    assert res.returncode == 2 and "use --task probe" in res.stderr + res.stdout


def test_mlm_run_logs_its_mask_rate_and_accuracy(small_recipe, tmp_path):
    kiln("train", small_recipe, *ENCODER, "--set", "objective.name=mlm", "--set", "train.name=mlm")
    recs = _train(tmp_path / "runs" / "mlm")
    assert len(recs) == 6
    for r in recs:  # 2 ranks x 4 x 64 positions: 0.15 +- 0.016 (1 sd)
        assert abs(r["objective/mask_rate"] - 0.15) < 0.08 and 0 <= r["objective/mlm_acc"] <= 1, r
    curve = losses(tmp_path / "runs" / "mlm")
    assert curve[6] < curve[1]


def test_encoder_objectives_refuse_a_causal_model(small_recipe):
    res = kiln("train", small_recipe, "--set", "objective.name=electra", check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "set model.causal=false" in res.stderr + res.stdout


def test_electra_sequence_parallel_run_follows_the_single_rank_run(small_recipe, tmp_path):
    # one data-parallel replica: the SP=2 ranks draw the masks and sampling noise of the single
    # rank before sharding, and the generator's attention runs the discriminator's ring too
    kiln("train", small_recipe, *ELECTRA, "--nproc", "1", "--set", "train.name=sp1")
    kiln("train", small_recipe, *ELECTRA, "--set", "parallel.sp=2", "--set", "train.name=sp2")
    ref, got = losses(tmp_path / "runs" / "sp1"), losses(tmp_path / "runs" / "sp2")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:  # the tolerance of the CLM test (tests/trainer/test_train.py)
        assert abs(got[step] - ref[step]) < 1e-4 * ref[step], (step, got[step], ref[step])
    rates = [[r["objective/replaced_frac"] for r in _train(tmp_path / "runs" / n)] for n in ("sp1", "sp2")]
    assert rates[0] == rates[1]
