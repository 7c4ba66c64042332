"""Folders published whole: built under a temporary name, manifest.json last, renamed into place.

The prepared folder (kiln.data.prepare) and its decomposition subfolder (kiln.data.decompose)
are both written this way, so that a reader that finds a folder under its final name with a
manifest can trust it: every file is listed there with its size and sha256, and an interrupted
build leaves only a temporary folder, which a later build of this host sweeps once its process
is gone. Each reader keeps its own manifest checks, because each names its own fix.
"""

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .tokenizer import write_atomic


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_dir(d: Path) -> None:
    """Flush a folder's entries to disk, so that a rename into or inside it survives a power cut."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, fields: dict) -> bool:
    """Write tmp/manifest.json from `fields` plus every file's size and sha256, then rename tmp to
    `final`; True when it is in place.

    The manifest goes last, so only a finished folder ever has one. False (tmp deleted) when the
    rename fails because another process put `final` in place first: the caller loads theirs.
    """
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {**fields, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_dir(final.parent)
    return True


def temp_dir(parent: Path, tag: str) -> Path:
    """A fresh, empty folder `.tmp-<host>-<pid>-<tag>` in `parent` to build into; host and pid in
    the name let remove_stale_temps tell a crashed build from a running one."""
    tmp = parent / f".tmp-{socket.gethostname()}-{os.getpid()}-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def remove_stale_temps(parent: Path) -> None:
    """Delete the temp_dir folders in `parent` left by crashed builds of this host (their process
    is gone). Folders of other hosts are kept: their pids mean nothing here."""
    host = socket.gethostname()
    for p in parent.glob(f".tmp-{host}-*"):
        try:
            pid = int(p.name[len(f".tmp-{host}-"):].split("-")[0])
            os.kill(pid, 0)
            if _is_zombie(pid):
                raise ProcessLookupError
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _is_zombie(pid: int) -> bool:
    """A killed process that nobody reaped (containers whose pid 1 is no init) still answers
    kill(pid, 0); /proc says it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
