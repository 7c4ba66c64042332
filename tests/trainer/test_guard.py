"""The loss-spike and NaN guard (kiln.trainer.hooks.guard): a step with a NaN loss leaves the
weights and the optimizer state as they were, the run goes on, and too many skips in a row stop it."""
from collections import deque
from types import SimpleNamespace

import pytest
import torch

from kiln.trainer.hooks.guard import GuardHook
from tests.trainer.conftest import kiln, metrics


def _states(step_dir):
    """{name: tensor} of the model and of every optimizer file of a checkpoint folder."""
    out = {}
    for f in sorted(step_dir.glob("*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        _flatten(state.get("module", {}), f"{f.name}/module", out)
        _flatten(state.get("optimizer_state_dict", state.get("optimizer", {})), f"{f.name}/optim", out)
    return out


def _flatten(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}/{i}", out)


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 3])
def test_nan_step_changes_no_weight(small_recipe, tmp_path, monkeypatch, zero):
    monkeypatch.setenv("KILN_TEST_NAN_STEPS", "3")
    res = kiln("train", small_recipe, "--set", "train.name=nan", "--set", "train.steps=5",
               "--set", f"parallel.zero_stage={zero}", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=0",
               timeout=600)
    assert "kiln: step 3 skipped: non-finite loss on 2 of 2 ranks; no optimizer update" in res.stdout
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    s2, s3, s4 = (_states(ckpts / f"step_{n:08d}") for n in (2, 3, 4))
    assert any(k.endswith("/module") or "/module/" in k for k in s2) and any("/optim/" in k for k in s2)
    assert _equal(s2, s3), "the NaN step changed the weights or the optimizer state"
    assert not _equal(s3, s4), "the step after the NaN one trained on"
    recs = [r for r in metrics(tmp_path / "runs" / "nan") if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in recs] == [0, 0, 1, 1, 1]
    assert [r["step"] for r in recs if r["train/loss"] != r["train/loss"]] == [3]  # the NaN is logged
    assert all(r["train/loss"] < 7 for r in recs if r["step"] != 3)


@pytest.mark.slow
def test_skips_in_a_row_stop_the_run(small_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_TEST_NAN_STEPS", "2,3,4")
    res = kiln("train", small_recipe, "--set", "train.name=stop", "--set", "parallel.zero_stage=2",
               "--set", "train.max_skips=1", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=0",
               check=False, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("kiln: error:")]
    assert errors == ["kiln: error: 2 steps in a row skipped (the last at step 3: non-finite loss on 2 of 2 "
                      "ranks), more than train.max_skips=1: the run stops; its newest checkpoint, "
                      "step_00000002, holds the last good weights: lower optim.lr or raise optim.grad_clip / "
                      "schedule.warmup_steps, then run again"], res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout
    ckpts = tmp_path / "runs" / "stop" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001", "step_00000002"]
    assert _equal(_states(ckpts / "step_00000001"), _states(ckpts / "step_00000002"))  # ZeRO-2 skip too


def _guard(**cfg):
    train = SimpleNamespace(**{"max_skips": 5, "spike_sigma": 3.0, "spike_window": 20, "spike_skip": False, **cfg})
    return GuardHook(train)


def test_spike_is_k_sigma_above_the_recent_window():
    g = _guard()
    assert not g._is_spike(100.0)  # too few steps seen to judge
    g.recent.extend([2.0, 2.2] * 5)  # mean 2.1, sample sd 0.1054
    assert not g._is_spike(2.1 + 3 * 0.105)
    assert g._is_spike(2.1 + 3 * 0.106)
    assert not g._is_spike(float("nan"))
    assert not _guard(spike_sigma=0.0)._is_spike(1e9)  # 0 = off


def test_guard_state_round_trips():
    g = _guard()
    g.skipped, g.spikes, g.row = 3, 2, 1
    g.recent.extend([1.0, 2.0])
    h = _guard()
    h.load_state_dict(g.state_dict())
    assert (h.skipped, h.spikes, h.row, list(h.recent)) == (3, 2, 1, [1.0, 2.0])
    assert isinstance(h.recent, deque) and h.recent.maxlen == 20
    h.load_state_dict({})  # a checkpoint from before the guard
    assert (h.skipped, h.spikes, h.row, list(h.recent)) == (0, 0, 0, [])
