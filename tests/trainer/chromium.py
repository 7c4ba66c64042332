"""Headless Chromium for the report page's test: Debian's `chromium` package, installed with apt when
missing, as slurm/local_cluster.sh installs slurm-wlm. Where it cannot be had (not root, no apt) the
caller skips and says why; CI here is root with apt, so the test runs.

    python -m tests.trainer.chromium          install it now (prints the binary's path)
"""
import os
import shutil
import subprocess
from pathlib import Path

NAMES = ("chromium", "chromium-browser")
APT = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]


class Unavailable(Exception):
    """Chromium is not installed and cannot be installed here; the message says why."""


def find() -> str | None:
    """Path of an installed Chromium, or None."""
    return next((p for p in map(shutil.which, NAMES) if p), None)


def ensure(log: Path | None = None) -> str:
    """Path of Chromium, installing Debian's package first if it is missing (about a minute)."""
    path = find()
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("chromium is not installed and cannot be installed here "
                          "(needs root and apt-get: apt-get install chromium)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = []
    for cmd in (APT, ["apt-get", "update"], APT):  # a stale package list: update once and retry
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        out.append(res.stdout + res.stderr)
        if find():
            break
    if log is not None:
        log.write_text("\n".join(out))
    path = find()
    if path is None:
        tail = "".join(out).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"apt-get install chromium failed: {tail[0]}")
    return path


def dump_dom(chromium: str, page: Path, profile: Path, timeout: float = 60) -> str:
    """The DOM of `page` after its scripts ran, as headless Chromium serialises it (`profile`: a
    throw-away user-data folder, so nothing is written to the home directory)."""
    # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start
    res = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                          "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"chromium failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


if __name__ == "__main__":
    print(ensure())
