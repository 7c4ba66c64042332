"""The metric catalogue, its schema, MFU's peak per precision, the memory window and W&B:
config and tags, one run across a resume with no lost rows, and failures that do not stop training."""
import json
import shutil

import pytest
import torch

from kiln.trainer import metrics as catalogue
from tests.trainer.conftest import ROOT, kiln, losses, metrics
from tests.trainer.wandb_files import history, run_records


def test_schema_and_docs_follow_the_catalogue():
    assert json.loads(catalogue.SCHEMA_PATH.read_text()) == catalogue.schema(), \
        "regenerate: python -m kiln.trainer.metrics --schema > trainer/metrics.schema.json"
    assert catalogue.markdown() in (ROOT / "docs" / "monitoring.md").read_text(), \
        "regenerate the table in docs/monitoring.md: python -m kiln.trainer.metrics --markdown"


def test_old_names_are_read_as_new_ones(tmp_path):
    """A run directory of the flat-name era reports in today's names (mfu was a fraction)."""
    import jsonschema

    old = {"step": 10, "time": 1.0, "loss": 4.5, "lr": 1e-3, "grad_norm": 0.5, "tokens": 5120, "flops": 1e9,
           "tokens_per_s": 900.0, "mfu": 0.25, "mem_gb": 1.5, "time/step_s": 0.2, "time/data_s": 0.01,
           "time/fwd_bwd_s": 0.15, "time/optim_s": 0.04}
    new = {"step": 11, "time": 2.0, "train/loss": 4.4, "train/lr": 1e-3, "train/tokens": 5632,
           "perf/tokens_per_s": 1.0, "perf/mfu_pct": 3.0}
    f = tmp_path / "metrics.jsonl"
    f.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n" + '{"step": 12, "train/lo')  # torn last line
    recs = catalogue.read_metrics(f)
    assert len(recs) == 2 and recs[1] == new
    up = recs[0]
    assert up["train/loss"] == 4.5 and up["perf/mfu_pct"] == 25.0 and up["perf/mem_peak_gb"] == 1.5
    assert up["perf/step_s"] == 0.2 and "loss" not in up and "mfu" not in up
    validator = jsonschema.Draft202012Validator(catalogue.schema())
    validator.validate(up)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(old)  # the schema holds today's names only
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"step": 1, "time": 1.0, "perf/mfu_pct": 3.0})  # neither a train nor an eval record


def test_peak_is_probed_and_cached_per_precision(tmp_path):
    from kiln.trainer.monitor import peak

    cpu = torch.device("cpu")
    fp32, src32 = peak(cpu, 1, str(tmp_path), "fp32")
    bf16, src16 = peak(cpu, 1, str(tmp_path), "bf16")
    assert "fp32" in src32 and "bf16" in src16 and fp32 > 0 and bf16 > 0
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert cache == {"threads=1": fp32, "threads=1,bf16,cpu": bf16}
    cache["threads=1,bf16,cpu"] = 123.0  # a second call reads the cache, per precision
    (tmp_path / "cpu_peak.json").write_text(json.dumps(cache))
    assert peak(cpu, 1, str(tmp_path), "bf16")[0] == 123.0 and peak(cpu, 1, str(tmp_path), "fp32")[0] == fp32


def test_memory_peak_is_per_window():
    from kiln.trainer.monitor import window_peak_gb

    cpu = torch.device("cpu")
    window_peak_gb(cpu)
    base = window_peak_gb(cpu)
    block = bytearray(300 * 2 ** 20)
    block[::4096] = b"\1" * len(block[::4096])  # touch every page: resident
    during = window_peak_gb(cpu)
    del block
    after = window_peak_gb(cpu)  # this window saw the block still resident at its start...
    later = window_peak_gb(cpu)  # ...this one did not
    assert during > base + 0.25 and after > base + 0.25 and later < during - 0.25, (base, during, after, later)


class _Recipe:
    """What Monitor reads of a recipe."""

    def __init__(self, mode="offline"):
        from kiln.trainer.run_config import LoggingConfig, TrainConfig

        self.logging, self.train = LoggingConfig(), TrainConfig(name="m")
        self.logging.wandb.mode = mode


@pytest.fixture
def own_wandb_service():
    """In-process W&B starts a service and names it in os.environ (WANDB_SERVICE): the kiln runs
    that later tests start must not inherit it, so the environment is restored and it is stopped."""
    import os

    import wandb

    saved = dict(os.environ)
    yield
    wandb.teardown()
    os.environ.clear()
    os.environ.update(saved)
    os.environ.pop("WANDB_SERVICE", None)  # whoever set it before, teardown has stopped that service


def test_a_wandb_failure_warns_once_and_the_metrics_file_goes_on(tmp_path, capsys, own_wandb_service):
    from kiln.trainer.monitor import Monitor

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "wandb").write_text("")  # W&B cannot create its folder: init fails
    m = Monitor(tmp_path / "a", _Recipe(), {}, 3, enabled=True)
    for s in (1, 2):
        m.log({"step": s, "eval/loss": 1.0, "eval/ppl": 2.7})
    m.close()
    out = capsys.readouterr().out
    assert out.count("W&B logging stopped") == 1 and "NotADirectoryError" in out
    assert [r["step"] for r in catalogue.read_metrics(tmp_path / "a" / "metrics.jsonl")] == [1, 2]

    (tmp_path / "b").mkdir()  # a failure after a good start: W&B's run goes away mid-training
    m = Monitor(tmp_path / "b", _Recipe(), {}, 3, enabled=True)
    m.log({"step": 1, "eval/loss": 1.0, "eval/ppl": 2.7})
    m.wandb.run.finish()
    for s in (2, 3):
        m.log({"step": s, "eval/loss": 1.0, "eval/ppl": 2.7})
    m.close()
    assert capsys.readouterr().out.count("W&B logging stopped") == 1
    assert [r["step"] for r in catalogue.read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow
def test_wandb_keeps_one_run_across_a_resume_and_the_global_batch_keeps_the_curve(small_recipe, tmp_path):
    """A run killed after logging steps 4-6 but before their checkpoint resumes from step 3: the
    same W&B run id continues, every W&B row keeps an increasing step (nothing dropped or
    overwritten when the offline folders are synced), and every kiln step is in the history.
    The run uses train.global_batch=8; at 1 rank (grad_accum 2) the loss curve is the 2-rank one."""
    sets = ["--set", "logging.wandb.mode=offline", "--set", "logging.wandb.tags=[ci, small]",
            "--set", "logging.wandb.group=g7", "--set", "train.global_batch=8"]
    kiln("train", small_recipe, *sets)
    run = tmp_path / "runs" / "small"
    full = losses(run)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")  # the crash: step 6's checkpoint never completed
    (ckpts / "latest").write_text("step_00000003")
    out = kiln("train", small_recipe, *sets).stdout
    assert "resuming" in out and "step_00000003" in out
    assert losses(run) == full  # the metrics file: steps 1-6 once, the resumed curve bitwise

    state = json.loads((run / "wandb_state.json").read_text())
    runs = run_records(run, state["id"])
    assert len(runs) == 2 and {r.run_id for r in runs} == {state["id"]}  # two offline folders, one run
    assert all(list(r.tags) == ["ci", "small"] and r.run_group == "g7" for r in runs)
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["train"]["global_batch"] == 8 and config["model"]["dim"] == 64  # the resolved recipe
    rows = history(run, state["id"])
    steps = [r["_step"] for r in rows]
    assert steps == list(range(len(rows))) and state["step"] == steps[-1]  # increasing across folders
    train = [r["step"] for r in rows if "train/loss" in r]
    assert train == [1, 2, 3, 4, 5, 6, 4, 5, 6]  # the redone steps are rows of their own
    redone = {r["step"]: r["train/loss"] for r in rows[-4:] if "train/loss" in r}
    assert redone == {s: full[s] for s in (4, 5, 6)}
    ckpt_state = json.loads((ckpts / "step_00000006" / "kiln_state.json").read_text())
    assert ckpt_state["monitor"]["wandb"] == state  # the checkpoint keeps the id and the row counter

    kiln("train", small_recipe, "--set", "train.global_batch=8", "--set", "train.name=one_rank", "--nproc", "1")
    one = losses(tmp_path / "runs" / "one_rank")
    assert one.keys() == full.keys()
    for s in full:  # the same rows in the same groups: equal up to summation order
        assert abs(one[s] - full[s]) < 1e-5 * abs(full[s]), (s, one[s], full[s])
    assert all(r["train/tokens"] == r["step"] * 8 * 64 for r in metrics(tmp_path / "runs" / "one_rank")
               if "train/loss" in r)


@pytest.mark.slow
def test_bf16_mfu_is_against_the_bf16_peak(small_recipe, kiln_home, tmp_path):
    """A bf16 run measures MFU against the probed bf16 GEMM rate, and stays at or below 100%."""
    out = kiln("train", small_recipe, "--set", "train.precision=bf16", "--set", "train.steps=3",
               "--set", "checkpoint.every=0", "--nproc", "1").stdout
    assert "probed bf16 GEMM" in out
    recs = [r for r in metrics(tmp_path / "runs" / "small") if "train/loss" in r]
    assert len(recs) == 3 and all(0 < r["perf/mfu_pct"] <= 100 for r in recs), [r["perf/mfu_pct"] for r in recs]
    probed = json.loads((kiln_home / "cache" / "cpu_peak.json").read_text())
    bf16 = [v for k, v in probed.items() if ",bf16," in k]
    assert len(bf16) == 1 and all(r["perf/peak_tflops_per_device"] == bf16[0] / 1e12 for r in recs)
