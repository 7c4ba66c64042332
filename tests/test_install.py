"""The reproducible install: the Makefile's stamp follows TORCH_SPEC and the constraints file, the
constraints pin the versions this venv (the one the tests run in) holds, and pyproject's floors.

The Makefile runs for real against a throw-away VENV with PYTHON=false: an install it decides on
fails at once on `false -m venv`, one it skips succeeds, so nothing is installed."""
import os
import re
import shutil
import subprocess
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make(venv: Path, **var):
    args = [f"{k}={v}" for k, v in {"VENV": venv, "PYTHON": "false", **var}.items()]
    return subprocess.run(["make", "-C", str(ROOT), "venv", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def installed(tmp_path):
    """A venv folder that `make` installed with the default TORCH_SPEC (as far as make can tell)."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    venv = tmp_path / "venv"
    venv.mkdir()
    spec = re.search(r"^TORCH_SPEC \?= (.*)$", (ROOT / "Makefile").read_text(), re.M)[1]
    (venv / ".kiln-torch-spec").write_text(spec + "\n")
    (venv / ".kiln-installed").touch()
    now = time.time()
    for f in ("pyproject.toml", "constraints.txt"):  # the stamp must be newer than what it depends on
        assert (ROOT / f).stat().st_mtime < now - 1, f"{f} was modified within the last second"
    os.utime(venv / ".kiln-torch-spec", (now - 2, now - 2))
    os.utime(venv / ".kiln-installed", (now - 1, now - 1))
    return venv


def test_an_installed_venv_is_left_alone(installed):
    res = _make(installed)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "-m venv" not in res.stdout


def test_a_new_torch_spec_reinstalls(installed):
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
    res = _make(installed, TORCH_SPEC=spec)
    assert res.returncode != 0 and "false -m venv" in res.stdout, res.stdout + res.stderr
    assert (installed / ".kiln-torch-spec").read_text().strip() == spec
    # and back: the old spec installs again too
    time.sleep(0.05)
    (installed / ".kiln-installed").touch()  # as if that install had run
    assert _make(installed, TORCH_SPEC=spec).returncode == 0
    res = _make(installed, TORCH_SPEC="torch==2.12.0")
    assert res.returncode != 0 and "false -m venv" in res.stdout


def test_newer_constraints_reinstall(installed, tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text("numpy==2.0.0\n")
    res = _make(installed, CONSTRAINTS=pins)
    assert res.returncode != 0 and "false -m venv" in res.stdout, res.stdout + res.stderr


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_tree(name: str, extra: str = "") -> set[str]:
    """Every distribution `pip install name[extra]` pulls in, read from this venv's metadata."""
    from packaging.requirements import Requirement
    seen: set[str] = set()
    todo = [(name, (extra,))]
    while todo:
        dist, extras = todo.pop()
        for line in metadata.distribution(dist).requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
                continue
            if _canon(req.name) not in seen:
                seen.add(_canon(req.name))
                todo.append((req.name, tuple(req.extras) or ("",)))
    return seen


def test_constraints_pin_what_the_tests_run_with():
    pins = _pins()
    assert len(pins) > 50
    assert not {"kiln", "torch", "triton"} & {k.lower() for k in pins}  # TORCH_SPEC picks the build
    assert {"deepspeed", "PyYAML", "transformers", "matplotlib"} <= set(pins)
    # a package installed by hand into this venv gets into `pip freeze`, but a clean checkout's
    # `make` never installs it (CI then fails here with PackageNotFoundError): pins = kiln[dev]'s tree
    stray = sorted(set(map(_canon, pins)) - _requirement_tree("kiln", "dev"))
    assert not stray, f"constraints.txt pins packages kiln[dev] does not need: {stray} (drop them)"
    differ = {k: (v, metadata.version(k)) for k, v in pins.items() if metadata.version(k) != v}
    assert not differ, f"this venv differs from constraints.txt (make constraints after a passing run): {differ}"


def test_pyproject_floors_and_extras():
    p = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert p["requires-python"] == ">=3.11"
    deps = {re.split(r"[<>=;\s]", d, maxsplit=1)[0]: d for d in p["dependencies"]}
    assert deps["torch"] == "torch>=2.9" and "PyYAML" in deps
    assert {re.split(r"[<>=]", d)[0] for d in p["optional-dependencies"]["bench"]} == \
        {"transformers", "liger-kernel", "matplotlib"}
