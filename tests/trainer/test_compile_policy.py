"""train.compile=auto: the decision against hand-computed cases, the measurement cache, the hook's
measurement of step times, and the decision line of a real run through the CLI."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from kiln.trainer.compile_policy import (DEFAULT_COMPILE_S, DEFAULT_GAIN, MARGIN, choose, decide, estimate,
                                         from_record, inapplicable, read_record, steps_left, timing_key,
                                         write_record)
from kiln.trainer.config import Recipe
from kiln.trainer.hooks.compile import CompileTimesHook, measure
from kiln.trainer.stage import resolve_model
from tests.trainer.conftest import kiln

# the defaults' own case: a make-train step of 0.54 s (7.6k tokens/s x 4096 tokens), 5% faster compiled
EAGER, GAIN = 0.54, 0.027


def test_a_short_run_stays_eager():
    on, why = decide(150, EAGER, GAIN, 9.4)
    # 150 x 27 ms = 4.05 s of saving against 1.5 x 9.4 = 14.1 s; 14.1 / 0.027 = 522.2
    assert not on and "150 steps x 27.0 ms saved" in why and "<= 1.5 x 9.4 s" in why
    assert "pays from 523 steps" in why


def test_a_long_run_compiles():
    on, why = decide(2000, EAGER, GAIN, 9.4)
    assert on and "2,000 steps x 27.0 ms saved = 54.0 s > 1.5 x 9.4 s" in why


def test_the_margin_is_strict():
    assert MARGIN == 1.5
    assert decide(120, 1.0, 0.125, 10.0)[0] is False  # 120 x 0.125 = 15 = 1.5 x 10: not more
    assert decide(121, 1.0, 0.125, 10.0)[0] is True


@pytest.mark.parametrize("gain", [0.0, -0.01, 0.004])  # 0.004 s of 0.5 s: 0.8%, under the 1% floor
def test_no_gain_stays_eager_however_long_the_run(gain):
    on, why = decide(10 ** 9, 0.5, gain, 1.0)
    assert not on and "not faster" in why


def test_what_compile_does_not_apply_to():
    r = Recipe()
    assert inapplicable(r) == ""
    r.parallel.sp = 2
    assert inapplicable(r) == "sequence parallelism"
    r = Recipe()
    r.model.mlp = "moe"
    assert inapplicable(r).startswith("MoE")
    r = Recipe()
    r.data.packing = "decompose"
    assert inapplicable(r) == "data.packing=decompose"


def test_missing_measurements_fall_back_to_defaults():
    est = from_record({}, lambda: 0.4)
    assert (est.eager_step_s, est.compile_s) == (0.4, DEFAULT_COMPILE_S)
    assert est.compiled_step_s == pytest.approx(0.4 * (1 - DEFAULT_GAIN))
    assert est.sources == {"eager": "FLOPs at 55% MFU", "compiled": "default -5%", "compile": "default, cold cache"}
    # a compiled run alone measured: the eager step is inferred from it, not from the FLOP count
    est = from_record({"compiled_step_s": 0.95, "compile_s": 2.0}, lambda: pytest.fail("FLOP estimate used"))
    assert est.eager_step_s == pytest.approx(1.0) and est.compile_s == 2.0
    est = from_record({"eager_step_s": 0.5, "compiled_step_s": 0.45, "compile_s": 3.0}, lambda: 0.0)
    assert set(est.sources.values()) == {"measured"} and est.gain_s == pytest.approx(0.05)


KEY = {"device": "cpu: test", "model": {"dim": 64}, "micro_batch": 4, "world": 2, "torch": "2.x"}


def test_cache_round_trip(tmp_path):
    path = tmp_path / "cache" / "compile_times.json"
    assert read_record(path, KEY) == {}  # no file yet
    write_record(path, KEY, {"eager_step_s": 0.5})
    write_record(path, KEY, {"compiled_step_s": 0.45, "compile_s": 9.0})  # merged, not replaced
    rec = read_record(path, KEY)
    assert (rec["eager_step_s"], rec["compiled_step_s"], rec["compile_s"]) == (0.5, 0.45, 9.0)
    assert read_record(path, {**KEY, "micro_batch": 8}) == {}  # another shape has no record
    write_record(path, {**KEY, "world": 4}, {"eager_step_s": 0.3})
    assert read_record(path, KEY)["eager_step_s"] == 0.5  # and does not disturb this one
    assert len(json.loads(path.read_text())) == 2
    assert [p.name for p in path.parent.iterdir()] == ["compile_times.json"]  # no temporary left
    path.write_text("{half a fi")
    assert read_record(path, KEY) == {}  # a corrupt cache is no record
    write_record(path, KEY, {"eager_step_s": 0.6})
    assert read_record(path, KEY)["eager_step_s"] == 0.6


def test_measurement_of_a_compiled_and_an_eager_run():
    # compiled: the first step's 10.0 s is 9.5 s of compile over the later steps' median 0.5 s
    assert measure([10.0, 0.5, 0.6, 0.4, 0.5], compiled=True) == {"compiled_step_s": 0.5, "compile_s": 9.5}
    assert measure([1.0, 0.5, 0.7, 0.4], compiled=False) == {"eager_step_s": 0.5}  # warm-up step left out
    assert measure([10.0, 0.5, 0.6], compiled=True) == {}  # two later steps: too few to record
    assert measure([0.3, 0.5, 0.5, 0.5], compiled=True)["compile_s"] == 0.0  # never negative


def test_the_hook_records_at_log_steps_and_the_last_step(tmp_path):
    path = tmp_path / "compile_times.json"
    hook = CompileTimesHook(compiled=True, path=path, key=KEY, writes=True, log_every=2, end=5)
    for step, s in enumerate([8.0, 0.5, 0.7], start=1):
        hook.step_end(None, step, s)
    assert not path.exists()  # step 2 logged, but one later step is too few
    hook.step_end(None, 4, 0.3)
    assert read_record(path, KEY)["compiled_step_s"] == 0.5
    hook.step_end(None, 5, 0.4)  # the stage's last step writes though it is no log step
    rec = read_record(path, KEY)  # later steps 0.5, 0.7, 0.3, 0.4: median 0.45
    assert (rec["compiled_step_s"], rec["compile_s"]) == pytest.approx((0.45, 7.55))
    other = CompileTimesHook(compiled=False, path=tmp_path / "other.json", key=KEY, writes=False, log_every=1, end=5)
    for step in range(1, 6):
        other.step_end(None, step, 0.5)
    assert not (tmp_path / "other.json").exists()  # only rank 0 writes


@pytest.fixture
def world_of_one(tmp_path):
    """A real one-rank gloo world, as `choose` runs in."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def stage_of(recipe, steps=150):
    """The parts of a Stage that the policy reads (a fresh start, on this CPU)."""
    run = SimpleNamespace(device=torch.device("cpu"), threads=1, bf16=False, resume_point=lambda: (0, 0))
    return SimpleNamespace(recipe=recipe, run=run, model_cfg=resolve_model(recipe, 512), end=steps, index=0)


def test_choose_follows_on_and_off_and_says_why_auto_stays_eager(world_of_one, tmp_path, capsys):
    r = Recipe()
    r.data.cache_dir = str(tmp_path / "cache")
    r.train.compile = "on"
    assert choose(stage_of(r)) is True
    r.train.compile = "off"
    assert choose(stage_of(r)) is False
    assert capsys.readouterr().out == ""  # the user's own choice needs no line
    r.train.compile, r.parallel.sp = "auto", 2
    assert choose(stage_of(r)) is False
    assert capsys.readouterr().out == ("kiln: train.compile=auto: eager (compile does not apply to sequence "
                                       "parallelism yet)\n")


def test_choose_decides_from_the_recorded_times(world_of_one, tmp_path, capsys):
    r = Recipe()
    r.data.cache_dir = str(tmp_path / "cache")
    stage = stage_of(r, steps=2000)
    write_record(tmp_path / "cache" / "compile_times.json", timing_key(stage),
                 {"eager_step_s": 0.5, "compiled_step_s": 0.47, "compile_s": 9.0})
    assert choose(stage) is True  # 2,000 x 30 ms = 60 s > 13.5 s
    line = capsys.readouterr().out
    assert line.startswith("kiln: train.compile=auto: compile (2,000 steps x 30.0 ms saved = 60.0 s > 1.5 x 9.0 s")
    assert "eager 0.500 s/step (measured), compiled 0.470 s/step (measured), compile 9.0 s (measured)" in line
    stage.end = 300  # 300 x 30 ms = 9 s
    assert choose(stage) is False and "eager (300 steps" in capsys.readouterr().out
    other = Recipe()
    other.data.cache_dir, other.train.micro_batch = r.data.cache_dir, 16  # another shape: not measured
    assert estimate(stage_of(other)).sources == {"eager": "FLOPs at 55% MFU", "compiled": "default -5%",
                                                 "compile": "default, cold cache"}


def test_steps_left_count_from_the_checkpoint_the_stage_resumes():
    stage = stage_of(Recipe(), steps=2000)
    assert steps_left(stage) == 2000
    stage.run.resume_point = lambda: (0, 1900)
    assert steps_left(stage) == 100
    stage.run.resume_point, stage.index, stage.start = (lambda: (0, 500)), 1, 500  # the next stage, fresh
    assert steps_left(stage) == 1500


@pytest.mark.slow
def test_auto_prints_its_decision_and_the_next_run_uses_the_measurement(small_recipe, tmp_path):
    cache = tmp_path / "policy-cache"  # no record yet; the data is prepared again here (seconds)
    first = kiln("train", small_recipe, "--set", "train.name=auto1", "--set", f"data.cache_dir={cache}").stdout
    lines = [x for x in first.splitlines() if x.startswith("kiln: train.compile=auto:")]
    assert len(lines) == 1, first  # rank 0 alone says it
    assert lines[0].startswith("kiln: train.compile=auto: eager (6 steps x ") and "FLOPs at 55% MFU" in lines[0]
    records = json.loads((cache / "compile_times.json").read_text())
    (rec,) = records.values()
    assert rec["eager_step_s"] > 0 and rec["key"]["world"] == 2 and "compiled_step_s" not in rec
    again = kiln("train", small_recipe, "--set", "train.name=auto2", "--set", f"data.cache_dir={cache}").stdout
    assert f"eager {rec['eager_step_s']:.3f} s/step (measured)" in again
