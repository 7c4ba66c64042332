"""Secrets (issue #19, item 8): the W&B API key, tokens and any variable whose name holds KEY,
TOKEN, SECRET or PASSWORD never reach what a run writes: the run dir (recipe, metrics, console
log, checkpoints, the W&B offline folder) and the sbatch script `kiln submit` renders.

Each planted variable carries a unique marker; every byte a real run wrote is searched for them.
"""
import os
from pathlib import Path

import pytest

from tests.fuzz.conftest import planted


def leaks(root: Path, markers: dict) -> list:
    """(file, variable) for every file under `root` that holds a marker."""
    found = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found += [(str(p.relative_to(root)), n) for n, m in markers.items() if m.encode() in data]
    return found


@pytest.mark.slow
def test_planted_secrets_never_reach_the_run_dir(trained_run):
    _, run, markers, res = trained_run
    assert (run / "wandb").is_dir() and (run / "console.log").is_file() and (run / "checkpoints").is_dir()
    assert any(run.glob("wandb/offline-run-*/run-*.wandb")), "W&B wrote no offline run to search"
    assert leaks(run, markers) == []
    printed = res.stdout + res.stderr
    assert [n for n, m in markers.items() if m in printed] == []


def test_planted_secrets_never_reach_the_sbatch_script(small_recipe, monkeypatch, capsys):
    from kiln.trainer.cli import main

    markers = planted()
    for name, value in markers.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", str(Path(os.__file__).parent))  # no sbatch/sinfo: a dry run off any cluster
    assert main(["submit", str(small_recipe), "--dry-run"]) == 0  # slurm.export: WANDB_API_KEY, HF_TOKEN
    out = capsys.readouterr()
    script = out.out
    assert script.startswith("#!/bin/bash") and "--export=ALL,WANDB_API_KEY,HF_TOKEN" in script  # by name only
    assert [n for n, m in markers.items() if m in script + out.err] == []
    assert os.environ["HF_TOKEN"] == markers["HF_TOKEN"]  # planted, so the check above had something to find
