"""G_stack in a real run (2 gloo ranks through the CLI): the small stage, the transition and the
grown stage; the same loss curve after a stop anywhere around the transition; the data stream
without repeats or gaps; checkpoints of any ZeRO stage grow the same; one line for bad requests."""
import shutil

import pytest
import torch

from kiln.growth.ops import stack
from tests.trainer.conftest import kiln, losses, metrics

pytestmark = pytest.mark.slow

GROW = ["--set", "model.n_layers=4", "--set", "growth.op=stack", "--set", "growth.factor=2",
        "--set", "growth.at_tokens=0.5", "--set", "train.steps=8", "--set", "checkpoint.every=3",
        "--set", "checkpoint.keep=0"]
T = 2 * 4 * 64  # ranks x micro_batch x seq_len


def test_grow_then_continue_and_resume_around_the_transition(small_recipe, tmp_path):
    res = kiln("train", small_recipe, *GROW, "--set", "train.name=g")
    assert "growth (stack) at step 4" in res.stdout and "stage 2 of 2" in res.stdout
    run = tmp_path / "runs" / "g"
    recs = metrics(run)
    train = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["growth/stage"] for r in train] == [0] * 4 + [1] * 4
    assert all(r["train/tokens"] == r["step"] * T for r in train)  # tokens count across the stages
    assert train[4]["train/flops"] > train[3]["train/flops"] and all(a["train/flops"] < b["train/flops"] for a, b in zip(train, train[1:]))
    lr = {r["step"]: r["train/lr"] for r in train}
    assert (lr[5], lr[6]) == (lr[1], lr[2])  # a fresh schedule with its own warmup
    event = next(r for r in recs if "growth/event" in r)
    assert event["step"] == 4 and event["growth/event"] == "grow:stack"
    assert event["growth/params_large"] > event["growth/params_small"]
    ref = losses(run)
    assert abs(ref[5] - ref[4]) < 0.2  # the grown model starts where the small one was
    # stop right after growing, and mid large stage (a stop mid small stage is the plain resume
    # tests/trainer/test_train.py covers)
    ckpts = run / "checkpoints"
    for keep in ("step_00000004", "step_00000006"):
        for d in ckpts.glob("step_*"):
            if d.name > keep:
                shutil.rmtree(d)
        (ckpts / "latest").write_text(keep)
        res = kiln("train", small_recipe, *GROW, "--set", "train.name=g")
        assert "resuming" in res.stdout
        assert ("growth (stack)" in res.stdout) == (keep < "step_00000006")  # grows once, never twice
        assert losses(run) == ref, keep


def test_data_stream_continues_across_the_transition(small_recipe):
    """Both stages read one stream: the small stage's source and the large one's give the same
    token ids at every step, and a run's steps never repeat a sample within an epoch."""
    import numpy as np

    from kiln.data.prepare import prepare
    from kiln.parallel.mesh import Mesh
    from kiln.trainer.batches import train_batches
    from kiln.trainer.config import load_recipe
    from kiln.trainer.stages import stage_specs

    recipe = load_recipe(small_recipe, [a for a in GROW if a != "--set"])
    small, large = stage_specs(recipe, 2)
    assert (small.end, large.start, large.end) == (4, 4, 8)
    data = prepare(recipe.data, progress=False)
    for rank in (0, 1):
        mesh = Mesh(rank=rank, world=2, sp=1)
        a, b = train_batches(small.recipe, data, mesh), train_batches(large.recipe, data, mesh)
        for step in range(8):
            assert torch.equal(a.batch(step)["input_ids"], b.batch(step)["input_ids"])
    src = train_batches(large.recipe, data, Mesh(rank=0, world=1, sp=1))
    seen = np.concatenate([src.global_samples(s) for s in range(min(8, src.num_samples // src.global_batch))])
    assert len(set(seen.tolist())) == len(seen)  # no repeats, and consecutive steps leave no gap:
    assert sorted(seen.tolist()) == sorted(src._perm(0)[:len(seen)].tolist())


def test_zero2_and_zero3_checkpoints_grow_like_the_unsharded_weights(small_recipe, tmp_path):
    from kiln.data.prepare import prepare
    from kiln.trainer.config import load_recipe
    from kiln.trainer.stage import resolve_model
    from kiln.infer.load import checkpoint_state

    short = ["--set", "train.steps=3", "--set", "checkpoint.every=3"]
    states = {}
    for zero in (0, 2, 3):
        kiln("train", small_recipe, *short, "--set", f"parallel.zero_stage={zero}", "--set", f"train.name=z{zero}")
        recipe = load_recipe(small_recipe)
        cfg = resolve_model(recipe, prepare(recipe.data, progress=False).vocab_size)
        tag = tmp_path / "runs" / f"z{zero}" / "checkpoints" / "step_00000003"
        states[zero] = checkpoint_state(tag, cfg, zero)
        if zero == 2:  # the fp32 master consolidated over both ranks equals the module file (fp32 run)
            module = checkpoint_state(tag, cfg, 0)
            assert all(torch.equal(states[2][k], module[k]) for k in module)
    for zero in (2, 3):
        assert states[zero].keys() == states[0].keys()
        grown, _ = stack(states[zero], cfg, 2)
        ref, _ = stack(states[0], cfg, 2)
        for k in ref:  # ZeRO shards state, not the function: the stages' curves agree to fp32 rounding
            torch.testing.assert_close(grown[k], ref[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sets, fragment", [
    (["growth.op=stack", "growth.factor=1"], "growth.factor must be >= 2"),
    (["growth.op=stack", "growth.factor=2", "growth.at_tokens=99999999"], "outside the run"),
    (["growth.op=stack", "growth.factor=2"], "growth.at_tokens=auto: d ="),
    (["growth.op=stack", "growth.factor=3"], "not a multiple of growth.factor=3"),
])
def test_bad_growth_recipes_get_one_line(small_recipe, sets, fragment):
    res = kiln("config", small_recipe, *[a for s in sets for a in ("--set", s)], "--set", "model.n_layers=4",
               check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("kiln: error: ") and fragment in line, line


def test_kiln_grow_writes_a_run_that_kiln_train_continues_as_the_large_model(small_recipe, tmp_path):
    from kiln.infer.load import checkpoint_state

    kiln("train", small_recipe, "--set", "train.steps=3", "--set", "train.name=s")
    small_tag = tmp_path / "runs" / "s" / "checkpoints" / "step_00000003"
    out = tmp_path / "runs" / "big"
    res = kiln("grow", tmp_path / "runs" / "s", "--factor", "2", "--out", out)
    assert "continue with: kiln train" in res.stdout
    grown = torch.load(out / "checkpoints" / "step_00000003" / "grown_model.pt", weights_only=True)
    import yaml

    big = yaml.safe_load((out / "recipe.yaml").read_text())
    assert big["model"]["n_layers"] == 4 and big["train"]["name"] == "big"
    small = checkpoint_state(small_tag, None, 0)
    assert all(torch.equal(grown[f"layers.{i}.attn.wqkv.weight"], small[f"layers.{i % 2}.attn.wqkv.weight"])
               for i in range(4))
    res = kiln("train", out / "recipe.yaml", "--set", "train.steps=5")
    recs = [r for r in metrics(out) if "train/loss" in r]
    assert [r["step"] for r in recs] == [4, 5] and recs[0]["train/tokens"] == 4 * T  # continues, fresh optimizer
    assert "kiln: checkpoint" in res.stdout
    again = kiln("grow", tmp_path / "runs" / "s", "--out", out, check=False)  # never overwrites a run
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.parametrize("extra", [
    ["model.mlp=moe", "model.moe.num_experts=4", "parallel.ep=2", "parallel.zero_stage=1"],
    ["data.packing=decompose", "data.buckets=[5, 7]", "data.num_cycles=2", "train.tokens_per_step=512"],
    ["parallel.sp=2"],
], ids=["moe-ep2-zero1", "decompose", "tokenring-sp2"])
def test_growth_beside_experts_decomposition_and_tokenring(small_recipe, tmp_path, extra):
    sets = [*GROW, "--set", "train.steps=6", "--set", "checkpoint.every=0", "--set", "train.name=m"]
    kiln("train", small_recipe, *sets, *[a for s in extra for a in ("--set", s)])
    recs = metrics(tmp_path / "runs" / "m")
    train = [r for r in recs if "train/loss" in r]
    assert [r["growth/stage"] for r in train] == [0] * 3 + [1] * 3
    assert any(r.get("growth/event") == "grow:stack" for r in recs)
    assert all(r["train/loss"] == r["train/loss"] and r["train/loss"] < 7 for r in train)  # finite, near ln(512) or below
    assert abs(train[3]["train/loss"] - train[2]["train/loss"]) < 0.3  # the grown model starts near the small one
