"""Verified checkpoints (issue #19, items 1, 2, 13): every checkpoint's manifest, a crafted pickle
dropped in place of each file refused before anything unpickles it (its payload never runs),
checkpoint.fallback, a missing `latest`, checkpoints without a manifest, and kiln's own files
loading with weights_only=True even where no manifest is there to check them."""
import json
import shutil

import pytest
import torch

from kiln.infer.checkpoint_manifest import MANIFEST, ManifestError, verify_manifest, write_manifest
from kiln.trainer.checkpoint import CheckpointError
from kiln.trainer.config import load_recipe
from kiln.trainer.run_dir import prepare_run_dir
from tests.trainer.conftest import kiln, losses

FAST = ["--set", "train.compile=off"]
MOE = ["--set", "model.mlp=moe", "--set", "model.moe.num_experts=4", "--set", "model.moe.top_k=2",
       "--set", "parallel.ep=2", "--set", "parallel.zero_stage=1", "--set", "schedule.decay=constant"]


class Payload:
    """A pickle whose loading writes a marker file: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def craft(path, marker) -> None:
    torch.save({"module": Payload(marker)}, path)


def one_error_line(res, *needles) -> str:
    """The run failed with exit 2 and one error line, the last (progress lines may precede it)."""
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if "error" in x.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("kiln: error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def test_manifest_lists_every_file_and_names_what_breaks_it(tmp_path):
    d = tmp_path / "step_00000001"
    (d / "sub").mkdir(parents=True)
    (d / "a.pt").write_bytes(b"a" * 100)
    (d / "sub" / "b.json").write_text("{}")
    doc = write_manifest(d)
    assert sorted(doc["files"]) == ["a.pt", "sub/b.json"] and doc["files"]["a.pt"]["size"] == 100
    assert verify_manifest(d) is True
    (d / "a.pt").write_bytes(b"b" * 100)  # same size, other bytes
    with pytest.raises(ManifestError, match="a.pt fails its manifest's sha256"):
        verify_manifest(d)
    (d / "a.pt").write_bytes(b"a" * 99)
    with pytest.raises(ManifestError, match="a.pt has 99 bytes, its manifest says 100"):
        verify_manifest(d)
    (d / "a.pt").write_bytes(b"a" * 100)
    (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")  # DeepSpeed globs some names
    with pytest.raises(ManifestError, match="zero_pp_rank_1.*not listed"):
        verify_manifest(d)
    (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (d / "sub" / "b.json").unlink()
    with pytest.raises(ManifestError, match="b.json is missing"):
        verify_manifest(d)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt"):
        verify_manifest(d)
    (d / MANIFEST).unlink()
    assert verify_manifest(d) is False  # no manifest: unverified, the caller decides


def test_kilns_own_files_never_unpickle_code(tmp_path):
    """Without a manifest to check (a checkpoint of an older kiln), kiln's RNG and expert files
    still load with weights_only=True: a crafted one is refused and its payload does not run."""
    from kiln.parallel.expert_state import _read
    from kiln.parallel.placement.io import PlacementError
    from kiln.trainer.checkpoint import _load_rng, _rng_state

    marker = tmp_path / "pwned"
    craft(tmp_path / "rng_rank0.pt", marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        _load_rng(tmp_path / "rng_rank0.pt")
    craft(tmp_path / "experts_ep0.pt", marker)
    with pytest.raises(PlacementError, match="unreadable"):
        _read(tmp_path / "experts_ep0.pt")
    assert not marker.exists()
    # today's RNG files and those of older kilns (numpy arrays inside) both load
    import random

    import numpy as np
    torch.save(_rng_state(), tmp_path / "new.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    for name in ("new.pt", "old.pt"):
        state = _load_rng(tmp_path / name)
        assert state["python"] == random.getstate() and torch.equal(state["torch"], torch.get_rng_state())


@pytest.mark.slow
def test_crafted_pickle_in_place_of_each_file_is_refused(small_recipe, tmp_path):
    """An expert-parallel ZeRO-1 run has every kind of file: DeepSpeed's model and optimizer
    states, kiln's RNG and expert files. Each in turn replaced by a crafted pickle: `kiln train`
    refuses in one line naming it and the previous verified checkpoint, the payload never runs;
    `kiln eval`'s loader refuses it too; checkpoint.fallback=true resumes from the previous one."""
    args = ["train", small_recipe, *FAST, *MOE, "--set", "checkpoint.every=2"]
    kiln(*args, "--set", "train.steps=4")
    run = tmp_path / "runs" / "small"
    ckpts = run / "checkpoints"
    tag = ckpts / "step_00000004"
    doc = json.loads((tag / MANIFEST).read_text())
    names = sorted(doc["files"])
    assert sorted(p.name for p in tag.iterdir() if p.name != MANIFEST) == names
    targets = [n for n in names if n.endswith("model_states.pt")][:1] + \
              [n for n in names if n.endswith("optim_states.pt")][:1] + ["rng_rank1.pt", "experts_ep0.pt"]
    assert all(t in names for t in targets) and len(set(targets)) == 4, names
    marker = tmp_path / "pwned"
    recipe = load_recipe(small_recipe, args[3::2])  # the --set values
    for i, name in enumerate(targets):
        original = (tag / name).read_bytes()
        craft(tag / name, marker)
        if i == 0:  # through the CLI: one line, exit 2, before any rank starts
            line = one_error_line(kiln(*args, "--set", "train.steps=6", check=False),
                                  f"{tag / name}", "its manifest", "write step_00000002 into",
                                  "checkpoint.fallback=true", "--no-resume")
        else:  # the same check `kiln train` makes first (kiln.trainer.run_dir), in this process
            with pytest.raises(CheckpointError) as e:
                prepare_run_dir(recipe, run, no_resume=False, launched=True)
            line = str(e.value)
            assert f"{tag / name}" in line and "write step_00000002 into" in line and "\n" not in line
        assert not marker.exists(), f"the payload in {name} ran"
        (tag / name).write_bytes(original)
    # outside training (kiln eval, export, grow read it with kiln.infer.load): refused as well
    from kiln.infer.load import checkpoint_state
    craft(tag / targets[0], marker)
    with pytest.raises(ManifestError, match="its manifest"):
        checkpoint_state(tag, None, 1)
    assert not marker.exists()
    # fallback: one line, the previous verified checkpoint, the run finishes; the damaged folder
    # is saved over (its crafted file gone), the payload never ran
    res = kiln(*args, "--set", "train.steps=6", "--set", "checkpoint.fallback=true")
    assert "fails its manifest" in res.stdout and "resuming from step_00000002" in res.stdout, res.stdout
    assert (ckpts / "latest").read_text() == "step_00000006" and not marker.exists()
    assert verify_manifest(ckpts / "step_00000006") and sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_missing_latest_and_missing_manifests(small_recipe, tmp_path):
    args = ["train", small_recipe, *FAST, "--set", "checkpoint.every=2", "--set", "checkpoint.keep=0"]
    kiln(*args, "--set", "train.steps=4")
    ckpts = tmp_path / "runs" / "small" / "checkpoints"
    # `latest` gone and the newest checkpoint damaged: the newest verified one, with one line
    (ckpts / "latest").unlink()
    (ckpts / "step_00000004" / "kiln_state.json").write_text('{"progress": {"step": 99}}')
    res = kiln(*args, "--set", "train.steps=5")
    assert "latest was missing: resuming from step_00000002" in res.stdout
    assert (ckpts / "latest").read_text() == "step_00000005"
    # a manifest removed while the run's other checkpoints have one: refused
    (ckpts / "step_00000005" / MANIFEST).unlink()
    one_error_line(kiln(*args, "--set", "train.steps=6", check=False),
                   "step_00000005 has no manifest although", "write step_00000004 into")
    # a run saved before manifests (none has one): resumes, with one warning line
    for m in ckpts.glob(f"step_*/{MANIFEST}"):
        m.unlink()
    res = kiln(*args, "--set", "train.steps=6")
    assert "step_00000005 has no manifest (saved by an older kiln)" in res.stdout
    # ... and its RNG file is still never unpickled in full: a crafted one stops the ranks, one line
    for m in ckpts.glob(f"step_*/{MANIFEST}"):
        m.unlink()
    marker = tmp_path / "pwned"
    craft(ckpts / "step_00000006" / "rng_rank0.pt", marker)
    one_error_line(kiln(*args, "--set", "train.steps=7", check=False), "step_00000006 cannot be loaded")
    assert not marker.exists()
    shutil.rmtree(ckpts)


def test_a_save_killed_before_its_manifest_is_not_a_checkpoint(tmp_path, capsys):
    """A first save killed after every file but before the manifest (no `latest` yet): the run
    starts over, as for any unfinished save; once the manifest is there it is the checkpoint
    (killed before `latest` moved) and `latest` is pointed at it. A folder of a kiln from before
    manifests (its recipe has no checkpoint.fallback) keeps the old guard: refused, never overwritten."""
    import yaml

    from kiln.trainer.config import Recipe, to_dict
    from kiln.trainer.run_dir import COMPLETE

    run = tmp_path / "runs" / "r"
    d = run / "checkpoints" / "step_00000002"
    d.mkdir(parents=True)
    for f in COMPLETE:
        (d / f).write_text("{}")
    (d / "kiln_recipe.yaml").write_text(yaml.safe_dump(to_dict(Recipe())))
    assert prepare_run_dir(Recipe(), run, no_resume=False, launched=True)
    assert not (run / "checkpoints" / "latest").exists()
    write_manifest(d)
    assert prepare_run_dir(Recipe(), run, no_resume=False, launched=True)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert "latest was missing: resuming from step_00000002" in capsys.readouterr().out
    (run / "checkpoints" / "latest").unlink()
    (d / MANIFEST).unlink()
    old = to_dict(Recipe())
    del old["checkpoint"]["fallback"]
    (d / "kiln_recipe.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(CheckpointError, match="no `latest` file"):
        prepare_run_dir(Recipe(), run, no_resume=False, launched=True)


@pytest.mark.slow
def test_async_checkpoints_are_whole_and_resume_bitwise(small_recipe, tmp_path):
    """checkpoint.async_save: every checkpoint written in the background verifies against its
    manifest, and a run resumed from one follows the uninterrupted run bitwise."""
    args = ["train", small_recipe, *FAST, "--set", "parallel.zero_stage=1", "--set", "checkpoint.every=1",
            "--set", "checkpoint.keep=0", "--set", "checkpoint.async_save=true", "--set", "train.steps=4"]
    res = kiln(*args)
    assert res.stdout.count("(written in the background)") == 3  # steps 1-3; the last save blocks
    run = tmp_path / "runs" / "small"
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert all(verify_manifest(ckpts / f"step_{s:08d}") for s in range(1, 5))
    assert not list(ckpts.glob("step_*/.kiln-saved-rank*"))  # the ranks' markers are gone
    ref = losses(run)
    (ckpts / "latest").write_text("step_00000002")
    assert "resuming" in kiln(*args).stdout
    assert losses(run) == ref
