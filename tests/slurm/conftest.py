"""A real Slurm for the tests: slurm/local_cluster.sh (what `make slurm-up` runs) starts slurmctld
and two slurmd on this machine for the session, and stops them after. Where Slurm cannot be
installed (not root, no apt) the tests skip and say why; CI here is root with apt, so they run."""
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT

SCRIPT = ROOT / "slurm" / "local_cluster.sh"

# recipes/tiny.yaml shrunk to the tests' small model: 2 CPU ranks, one thread each (a 1-node and a
# 2-node job then compute alike); steps take tens of milliseconds
SHRINK = ("model.dim=64 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2 data.vocab_size=512 data.seq_len=64 "
          "data.max_documents=60 train.steps=6 train.micro_batch=4 train.nproc=2 train.threads=1 train.log_every=1 "
          "train.eval_every=0 train.eval_batches=1 logging.wandb.mode=disabled checkpoint.every=20 optim.lr=0.003 "
          "schedule.warmup_steps=2").split()


def _free_base_port() -> int:
    """A port p with p+1 and p+2 free too: slurmctld's and the two slurmd's."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            base = s.getsockname()[1]
        if base > 60000:
            continue
        try:
            for p in (base + 1, base + 2):
                with socket.socket() as s:
                    s.bind(("", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports for the test cluster")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running 2-node cluster (two slurmd on this host); skips where Slurm cannot be had."""
    home = tmp_path_factory.mktemp("slurm")
    base = _free_base_port()
    env = dict(os.environ, KILN_SLURM_NODES="2", KILN_SLURM_PORT=str(base), KILN_SLURMD_PORT=str(base))
    res = subprocess.run(["bash", str(SCRIPT), "up", str(home)], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode == 3:
        print(f"\n{res.stdout.strip()}")  # the reason, in the pytest output
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, f"local_cluster.sh up failed:\n{res.stdout}\n{res.stderr}"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(home / "slurm.conf")
    yield home / "slurm.conf"
    subprocess.run(["bash", str(SCRIPT), "down", str(home)], env=env, capture_output=True, timeout=60)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="session")
def slurm_recipe(slurm_cluster, tmp_path_factory):
    """`recipes/tiny.yaml --set ...` (shrunk) as kiln arguments, its data prepared once."""
    from tests.trainer.conftest import kiln

    home = tmp_path_factory.mktemp("slurm_runs")
    args = [str(ROOT / "recipes" / "tiny.yaml")]
    for item in SHRINK + [f"data.cache_dir={home / 'cache'}", f"train.run_root={home / 'runs'}"]:
        args += ["--set", item]
    kiln("prepare", *args)
    return args


def squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def scontrol(job: str) -> dict:
    import re

    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}


def wait_done(job: str, log_glob: Path, timeout: float = 300) -> float:
    """Wait until Slurm has no live task of `job` left; seconds waited. Fails with the log tail."""
    t0 = time.time()
    while squeue(job):
        if time.time() - t0 > timeout:
            logs = "".join(p.read_text()[-3000:] for p in log_glob.parent.glob(log_glob.name))
            subprocess.run(["scancel", job])
            raise AssertionError(f"job {job} still {squeue(job)} after {timeout} s:\n{logs}")
        time.sleep(0.5)
    return time.time() - t0


def wait_for_step(metrics: Path, step: int, job: str, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.is_file():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return
        assert squeue(job), f"job {job} ended before step {step}"
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not reach step {step} within {timeout} s")
