"""Shared pieces for end-to-end trainer tests: a small prepared corpus and a kiln runner."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A model and corpus small enough for 2 CPU cores: steps take tens of milliseconds.
SMALL = """
model: {dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2}
data: {source: stdlib, vocab_size: 512, seq_len: 64, max_documents: 60, cache_dir: CACHE}
train: {steps: 6, micro_batch: 4, nproc: 2, log_every: 1, eval_every: 0, eval_batches: 1, run_root: RUNS}
logging: {wandb: {mode: disabled}}
checkpoint: {every: 3}
optim: {lr: 0.003}
schedule: {warmup_steps: 2}
"""


@pytest.fixture(scope="session")
def kiln_home(tmp_path_factory):
    """A directory holding the data cache (shared by all runs) and the runs."""
    home = tmp_path_factory.mktemp("kiln")
    (home / "runs").mkdir()
    return home


@pytest.fixture
def small_recipe(kiln_home, tmp_path):
    """Path of a small recipe whose cache is shared across tests and whose runs go to tmp_path."""
    p = tmp_path / "small.yaml"
    p.write_text(SMALL.replace("CACHE", str(kiln_home / "cache")).replace("RUNS", str(tmp_path / "runs")))
    return p


# A 2-rank expert-parallel MoE of the SMALL shape: trained once per session (moe_ep_run) and read by
# the tests that evaluate, serve or export a checkpoint.
MOE_EP = ["--set", "model.mlp=moe", "--set", "model.moe.num_experts=4", "--set", "model.moe.top_k=2",
          "--set", "parallel.ep=2", "--set", "train.steps=4", "--set", "checkpoint.every=4", "--set", "train.name=moe"]


@pytest.fixture(scope="session")
def moe_ep_run(kiln_home):
    """The run directory of the shared expert-parallel MoE run (treat it as read-only; files beside
    its checkpoint, such as ExpertFlow's predictor, are the readers' own)."""
    recipe = kiln_home / "moe_ep.yaml"
    recipe.write_text(SMALL.replace("CACHE", str(kiln_home / "cache")).replace("RUNS", str(kiln_home / "shared")))
    kiln("train", recipe, *MOE_EP, timeout=600)
    return kiln_home / "shared" / "moe"


def kiln(*args, check=True, timeout=300, **popen):
    """Run the `kiln` CLI in a subprocess (as users do); returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WANDB_SERVICE", None)  # set by in-process W&B in earlier tests: a run starts its own service
    res = subprocess.run([sys.executable, "-m", "kiln.trainer.cli", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, env=env, **popen)
    if check and res.returncode != 0:
        raise AssertionError(f"kiln {' '.join(map(str, args))} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def metrics(run_dir: Path) -> list[dict]:
    """The run's metrics records, each validated against the checked-in schema
    (trainer/metrics.schema.json): every training test checks every record it reads."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for r in recs:
        _VALIDATOR.validate(r)
    return recs


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def _validator():
    import jsonschema

    from kiln.trainer.metrics import SCHEMA_PATH

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


_VALIDATOR = _validator()
