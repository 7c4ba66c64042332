"""kiln's regression guard: four shipped recipes, shortened, must log bitwise the losses recorded
in fixtures/losses.json (the commit they came from is in the file).

A change that only moves code must leave every number where it was. A deliberate numeric change
re-records the fixture in its own commit, with the reason in its message:

    .venv/bin/python -m tests.trainer.test_regression --record

The runs use one torch thread per rank (GEMM results depend on the thread count) and a subset of
the embedded corpus; the fixture also names the CPU it was recorded on, since another instruction
set can round differently.
"""
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, kiln, metrics

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "losses.json"
COMMON = ["train.steps=20", "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
          "train.threads=1", "checkpoint.every=0", "logging.wandb.mode=disabled", "data.max_documents=400",
          "train.compile=off"]
RUNS = {
    "tiny": ("recipes/tiny.yaml", []),
    "moe_tiny": ("recipes/moe_tiny.yaml", ["parallel.profile_every=0"]),
    "long_context": ("recipes/long_context.yaml", ["data.seq_len=4096"]),
    "tiny_decompose": ("recipes/tiny.yaml", ["data.packing=decompose", "data.buckets=[5, 8]",
                                             "data.num_cycles=2", "train.tokens_per_step=4096"]),
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run_losses(name: str, home: Path) -> dict:
    """{"train": [20 losses], "eval": final held-out loss} of one shortened recipe."""
    recipe, extra = RUNS[name]
    sets = [*COMMON, *extra, f"data.cache_dir={home / 'cache'}", f"train.run_root={home / 'runs'}",
            f"train.name={name}"]
    kiln("train", ROOT / recipe, *[a for s in sets for a in ("--set", s)], timeout=600)
    recs = metrics(home / "runs" / name)
    train = [r["train/loss"] for r in recs if "train/loss" in r]
    ev = [r["eval/loss"] for r in recs if "eval/loss" in r]
    return {"train": train, "eval": ev[-1]}


@pytest.fixture(scope="module")
def recorded():
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_losses_match_the_recorded_curve_bitwise(name, recorded, kiln_home):
    got = run_losses(name, kiln_home)
    want = recorded["runs"][name]
    assert len(got["train"]) == 20
    assert got == want, (f"{name}: losses moved from the curve recorded at {recorded['commit']} on "
                         f"{recorded['cpu']} (this CPU: {cpu_name()}):\n got {got}\nwant {want}")


def record() -> None:
    """Write fixtures/losses.json from the current tree (run it before a change that moves code)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!tests"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as d:
        runs = {name: run_losses(name, Path(d)) for name in RUNS}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"commit": commit + ("+changes" if dirty else ""), "cpu": cpu_name(),
                                   "overrides": COMMON, "runs": runs}, indent=1) + "\n")
    print(f"recorded {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.trainer.test_regression --record")
    record()
