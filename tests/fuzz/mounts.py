"""Small file systems for the storage cases: a tmpfs of a given size (a disk that fills up) and a
read-only bind mount (a run dir or cache the user cannot write). kiln's tests run as root here,
where chmod cannot stop a write, so read-only needs a mount; without the right to mount, a
non-root user gets the chmod stand-in, and a root without it fails the test (no silent skip)."""
import contextlib
import os
import stat
import subprocess
from pathlib import Path


def _mount(*args) -> None:
    res = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mount {' '.join(map(str, args))} failed: {res.stderr.strip()}")


def _umount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str):
    """A tmpfs of `size` (e.g. "48k") at `path` for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only_bind(source: Path, target: Path):
    """`source` seen read-only at `target` (they may be the same folder); chmod for a non-root user."""
    if os.geteuid() != 0:
        mode = source.stat().st_mode
        source.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            yield source
        finally:
            source.chmod(mode)
        return
    target.mkdir(parents=True, exist_ok=True)
    _mount("--bind", source, target)
    try:
        _mount("-o", "remount,bind,ro", target)
        yield target
    finally:
        _umount(target)
