"""SIGTERM and SIGUSR1 outside Slurm (kiln.trainer.hooks.stop, kiln.trainer.launch): a checkpoint at
the end of the current step, then a clean exit, and the same command resumes from there."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.trainer.conftest import ROOT, kiln


def _start(recipe, name):
    """`kiln train` in a session of its own (so the test can signal its whole process group)."""
    return subprocess.Popen([sys.executable, "-m", "kiln.trainer.cli", "train", str(recipe), "--set",
                             f"train.name={name}", "--set", "train.steps=400", "--set", "checkpoint.every=1000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig,target", [(signal.SIGTERM, "parent"), (signal.SIGUSR1, "group")])
def test_signal_checkpoints_at_the_step_end_and_exits_cleanly(small_recipe, tmp_path, sig, target):
    proc = _start(small_recipe, "sig")
    seen = []
    deadline = time.time() + 500
    for line in proc.stdout:  # wait until training is under way
        seen.append(line)
        if line.startswith("step      3/") or time.time() > deadline:
            break
    (os.kill if target == "parent" else os.killpg)(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    out = "".join(seen) + out
    assert proc.returncode == 0, err[-2000:]
    m = re.search(rf"kiln: stopped by {sig.name} after step_(\d+) \(checkpoint saved\): run the same command "
                  r"to resume", out)
    assert m, out[-2000:] + err[-2000:]
    stopped = int(m[1])
    assert 3 <= stopped < 400
    assert "Traceback" not in out + err
    assert "kiln: done" not in out  # a stop is not the run's end
    ckpts = tmp_path / "runs" / "sig" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{stopped:08d}"
    if target == "parent":  # the same command resumes from that step and finishes
        res = kiln("train", small_recipe, "--set", "train.name=sig", "--set", "train.steps=400",
                   "--set", "checkpoint.every=1000", timeout=600)
        assert f"steps {stopped}->400" in res.stdout
        assert "kiln: stopped" not in res.stdout and "kiln: done" in res.stdout
