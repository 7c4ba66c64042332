"""kill -9 at seeded moments (issue #19, item 1): a 2-rank run is killed, launcher and ranks at
once, 10 times (before training, after a step, and inside a save: after every rank's files but
before the manifest, and after the manifest but before `latest`); each time the same command
resumes from a valid checkpoint, and the run finally finishes with the loss curve of the
uninterrupted run, bitwise (CPU, same world size). The trials and their outcomes are printed."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.infer.checkpoint_manifest import verify_manifest
from tests.trainer.conftest import ROOT, kiln, losses

pytestmark = pytest.mark.slow

STEPS = 8
TRIALS = 10


def _tree(pid: int) -> list:
    """`pid` and every process below it (the ranks run in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_tree(pid: int) -> None:
    for p in _tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _attempt(args: list, env: dict, moment: tuple) -> str:
    """Run `kiln train` until `moment` (kind, value) comes, then SIGKILL it all; the outcome."""
    kind, value = moment
    proc = subprocess.Popen([sys.executable, "-m", "kiln.trainer.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0, seen_saves, out = time.time(), 0, []
    try:
        for line in proc.stdout:
            out.append(line)
            hit = (kind == "step" and line.startswith(f"step {value:>6}/")) or \
                  (kind == "save" and line.startswith("kiln: test: inside save") and
                   (seen_saves := seen_saves + 1) == value) or \
                  (kind == "start" and line.startswith("kiln: run dir") and not time.sleep(value))
            if hit:
                _kill_tree(proc.pid)
                proc.wait()
                return f"killed at {kind} {value} ({line.strip()[:70]!r}, {time.time() - t0:.1f} s)"
        rc = proc.wait(timeout=300)
    finally:
        _kill_tree(proc.pid)
    assert rc == 0, "".join(out[-40:])
    return "finished before the moment came"


def test_kill_9_at_seeded_moments_resumes_to_the_same_curve(small_recipe, tmp_path):
    common = ["train", small_recipe, "--set", "train.compile=off", "--set", f"train.steps={STEPS}",
              "--set", "checkpoint.every=2", "--set", "parallel.zero_stage=1"]
    kiln(*common, "--set", "train.name=straight")
    reference = losses(tmp_path / "runs" / "straight")
    assert sorted(reference) == list(range(1, STEPS + 1))

    rng = random.Random(19)
    kinds = ["save"] * 5 + ["step"] * 4 + ["start"]
    rng.shuffle(kinds)
    env = dict(os.environ, PYTHONUNBUFFERED="1", KILN_TEST_SAVE_PAUSE_S="0.3")
    run = tmp_path / "runs" / "killed"
    latest = run / "checkpoints" / "latest"
    args = [*common, "--set", "train.name=killed"]
    moments, outcomes = [], []
    for kind in kinds:
        # a moment this attempt reaches: it resumes from `latest` (a kill never lets it name the end)
        done = int(latest.read_text()[5:]) if latest.exists() else 0
        if kind == "save":  # each save pauses twice: before its manifest, before `latest`
            moment = ("save", rng.randint(1, 2 * ((STEPS - done) // 2)))
        elif kind == "step":
            moment = ("step", rng.randint(done + 1, STEPS))
        else:
            moment = ("start", round(rng.uniform(0.0, 2.0), 2))
        moments.append(moment)
        outcomes.append(f"from step {done}: " + _attempt(args, env, moment))
        if latest.exists():  # whatever `latest` names is whole: its manifest verifies
            assert verify_manifest(run / "checkpoints" / latest.read_text())
    print(f"\nkill -9 trials: {len(moments)}")
    for m, o in zip(moments, outcomes):
        print(f"  {m[0]:5} {m[1]:<6.3g} -> {o}")
    assert sum(": killed" in o for o in outcomes) == TRIALS
    assert sum(": killed at save" in o for o in outcomes) >= 3  # some inside a save
    res = kiln(*args)
    assert losses(run) == reference, "the resumed curve differs from the uninterrupted one"
    assert "resuming" in res.stdout or "already finished" in res.stdout
