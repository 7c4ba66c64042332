"""`kiln eval`, `kiln generate` and `kiln expertflow train-predictor` through the real CLI on a
checkpoint written by 2 expert-parallel gloo ranks: offloading changes no number or token, the
predictor is saved with its manifest, and user errors give one line and exit 2."""
import json

import pytest

from tests.trainer.conftest import kiln

pytestmark = pytest.mark.slow


def test_eval_generate_offload_and_predictor(small_recipe, moe_ep_run, tmp_path, capsys):
    run = moe_ep_run
    out = tmp_path / "out"

    kiln("eval", run, "--batches", "2", "--metrics-out", out / "eval.json")
    kiln("eval", run, "--batches", "2", "--offload", "--cache-experts", "1", "--metrics-out", out / "eval_off.json")
    plain, off = (json.loads((out / f).read_text()) for f in ("eval.json", "eval_off.json"))
    assert off["loss"] == plain["loss"] and plain["batches"] == 2      # bitwise: the same float
    ef = off["expertflow"]
    assert ef["slots"] == 1 and ef["misses"] > 0 and 0 <= ef["hit_rate"] < 1 and ef["tokens"] == plain["tokens"]

    # the same held-out loss as the model loaded in-process through kiln.infer
    from kiln.data.loader import ChunkLoader
    from kiln.infer.evaluate import heldout_loss
    from kiln.trainer.commands.common import open_checkpoint

    ckpt = open_checkpoint(run)
    loader = ChunkLoader(ckpt.data.valid_prefix, ckpt.recipe.data.seq_len, ckpt.recipe.train.micro_batch, 0, 1,
                         ckpt.recipe.train.seed)
    assert heldout_loss(ckpt.model(), loader.eval_batches(2))["loss"] == plain["loss"]

    res = kiln("expertflow", "train-predictor", run, "--sequences", "32", "--heldout", "16", "--steps", "20")
    assert "accuracy per layer" in res.stdout
    manifest = json.loads((ckpt.tag_dir / "expertflow" / "predictor.json").read_text())
    assert manifest["checkpoint"] == str(ckpt.tag_dir) and "predictor.pt" in manifest["files"]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main():\nimport os\n\nclass A:\n")
    gen = ["generate", run, "--prompts", prompts, "--max-new", "6", "--batch-size", "2"]
    kiln(*gen, "--metrics-out", out / "gen.json")
    res = kiln(*gen, "--offload", "--cache-experts", "1", "--metrics-out", out / "gen_off.json")
    assert "hit rate" in res.stdout
    kiln(*gen, "--offload", "--cache-experts", "2", "--schedule", "--metrics-out", out / "gen_sched.json")
    kiln(*gen, "--offload", "--no-predictor", "--metrics-out", out / "gen_lru.json")
    ref = json.loads((out / "gen.json").read_text())
    assert ref["prompts"] == 3 and len(ref["outputs"]) == 3
    for f in ("gen_off.json", "gen_sched.json", "gen_lru.json"):
        got = json.loads((out / f).read_text())
        assert got["outputs"] == ref["outputs"], f           # offloading never changes a token
    assert json.loads((out / "gen_sched.json").read_text())["expertflow"]["prefetched"] > 0
    assert json.loads((out / "gen_lru.json").read_text())["expertflow"]["prefetched"] == 0

    # user errors: one line each, exit 2 (in this process, through the same entry point)
    from kiln.trainer.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    kiln("train", small_recipe, "--set", "train.steps=2", "--set", "checkpoint.every=2", "--set", "train.nproc=1",
         "--set", "train.name=dense")
    not_kiln = tmp_path / "not_kiln"
    not_kiln.mkdir()
    (not_kiln / "model.bin").write_bytes(b"\0" * 64)
    for args, words in (
            (["eval", tmp_path / "runs" / "dense", "--offload"], "dense model"),
            (["eval", run, "--offload", "--cache-experts", "5"], "between 1 and the model's 4"),
            (["generate", run, "--prompts", empty], "holds no prompts"),
            (["generate", run, "--prompts", tmp_path / "nope.txt"], "is not a file"),
            (["generate", run], "needs --prompt"),
            (["generate", run, "--prompt", "x", "--schedule"], "--schedule"),
            (["eval", not_kiln], "neither a kiln run directory"),
            (["eval", run, "--task", "mmlu"], "unknown --task"),
            (["expertflow", "train-predictor", tmp_path / "runs" / "dense"], "dense model")):
        capsys.readouterr()
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and words in err, (args, err[-2000:])
        assert len(err.strip().splitlines()) == 1, err
