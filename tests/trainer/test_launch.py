"""Joining a world another launcher started: torchrun directly (srun's variables: tests/slurm)."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.trainer.launch import _Relay
from tests.trainer.conftest import ROOT, kiln, losses


@pytest.mark.slow
def test_kiln_train_under_torchrun_joins_the_world(small_recipe, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29633",
           "-m", "kiln.trainer.cli", "train", str(small_recipe), "--set", "train.name=tr",
           "--set", "train.steps=3"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(losses(tmp_path / "runs" / "tr")) == [1, 2, 3]
    assert res.stdout.count("kiln: done.") == 1  # rank 0 reports, not every rank


@pytest.mark.slow
def test_slow_prepare_on_rank_0_outlasts_the_collective_timeout(small_recipe, tmp_path):
    # the whole embedded corpus into a fresh cache (>10 s here) against a 6 s collective timeout:
    # rank 1 waits on the rendezvous store, not in a collective that would time out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29634",
           "-m", "kiln.trainer.cli", "train", str(small_recipe), "--set", "train.name=slowprep",
           "--set", "train.steps=2", "--set", "train.dist_timeout_s=6",
           "--set", f"data.cache_dir={tmp_path / 'fresh'}", "--set", "data.max_documents=0",
           "--set", "data.vocab_size=8192"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[kiln prepare]" in res.stderr + res.stdout and time.time() - t0 > 6
    assert sorted(losses(tmp_path / "runs" / "slowprep")) == [1, 2]


AGENT_REPORT = (b"E1201 13:31:22.714000 7899 torch/distributed/elastic/multiprocessing/api.py:1002] "
                b"failed (exitcode: 1) local_rank: 0 (pid: 7901)\n"
                b"Traceback (most recent call last):\n  File \"run.py\"\n"
                b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")


def _relay(stream: bytes, rc: int, capsys):
    import io
    r = _Relay()
    r.pump(io.BytesIO(stream))
    return r.finish(rc), capsys.readouterr().err


def test_relay_one_line_per_user_error_and_no_launcher_report(capsys):
    err = b"kiln: error: checkpoint x cannot be loaded: fix it\n"
    stopping = b"W1201 14:37:01.185000 30966 torch/distributed/elastic/multiprocessing/api.py:1028] " \
               b"Sending process 30968 closing signal SIGTERM\n"  # the other rank, stopped
    rc, out = _relay(b"step 1\n" + err + stopping + err + AGENT_REPORT, 1, capsys)
    assert rc == 2 and out == "step 1\n" + err.decode()


def test_relay_names_a_rank_killed_by_a_signal(capsys):
    killed = (b"W1201 16:35:35.225000 5468 torch/distributed/elastic/multiprocessing/api.py:1028] "
              b"Sending process 5470 closing signal SIGTERM\n"
              b"E1201 16:35:35.258000 5468 torch/distributed/elastic/multiprocessing/api.py:1002] "
              b"failed (exitcode: -9) local_rank: 1 (pid: 5471) of binary: python\n"
              b"Traceback (most recent call last):\nChildFailedError:\n")
    import io
    r = _Relay()
    r.pump(io.BytesIO(b"step 1\n" + killed))
    assert r.finish(1, "the newest checkpoint, step_00000004, is kept") == 1
    assert capsys.readouterr().err == (
        "step 1\n"
        "kiln: error: rank 1 was killed by SIGKILL (the out-of-memory killer does this: check `dmesg`, then "
        "lower train.micro_batch or run fewer ranks); the newest checkpoint, step_00000004, is kept: run the "
        "same command to resume\n")


def test_relay_shows_the_report_when_a_rank_crashed(capsys):
    crash = b"[rank0]: Traceback (most recent call last):\n[rank0]: ZeroDivisionError: boom\n"
    rc, out = _relay(b"step 1\n" + crash + AGENT_REPORT, 1, capsys)
    assert rc == 1 and out == (b"step 1\n" + crash + AGENT_REPORT).decode()
    r = _Relay()  # Ctrl-C: the ranks' and torchrun's tracebacks while stopping are held back
    r.pump(__import__("io").BytesIO(b"step 1\n"))
    r.interrupted = True
    r.pump(__import__("io").BytesIO(crash + AGENT_REPORT))
    assert r.finish(1) == 130 and capsys.readouterr().err == "step 1\n"


@pytest.mark.parametrize("cache", ["xdg", "home"])
def test_extensions_root_is_torchs_build_folder(tmp_path, monkeypatch, cache):
    """kiln names torch's JIT build folder without importing torch: the same folder torch builds in."""
    from torch.utils.cpp_extension import _get_build_directory

    from kiln.trainer.launch import extensions_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    if cache == "xdg":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    else:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Path(_get_build_directory("some_op", verbose=False)).parent == extensions_root()
    assert str(extensions_root()).startswith(str(tmp_path)) and "torch" in sys.modules


def test_a_stale_build_lock_is_removed(tmp_path, monkeypatch):
    from kiln.trainer.launch import clear_stale_build_locks, extensions_root

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()  # what an interrupted build leaves: torch's FileBaton file, nobody holding it
    assert clear_stale_build_locks() == [
        f"kiln: removed {lock}, a build lock no process holds (a build of deepspeed_shm_comm was "
        "interrupted): the op builds again"]
    assert not lock.exists()
    assert clear_stale_build_locks() == []


def test_a_held_build_lock_is_left_to_its_builder(tmp_path):
    from kiln.trainer.launch import clear_stale_build_locks

    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    builder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                                f"fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); print(1, flush=True); "
                                "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline() == "1\n"  # it holds the lock, as FileBaton does while building
        assert clear_stale_build_locks(tmp_path) == [
            f"kiln: process {builder.pid} is building op (it holds {lock}); the ranks wait for it"]
        assert lock.exists()
    finally:
        builder.kill()
        builder.wait()
    assert clear_stale_build_locks(tmp_path)[0].startswith(f"kiln: removed {lock}")


@pytest.mark.slow
def test_kiln_train_goes_past_a_planted_build_lock(small_recipe, tmp_path, monkeypatch):
    """The reported hang: a lock left in the extensions folder made every later `kiln train` wait
    forever with no output. A copy of the built op (the real cache is left alone) plus a lock."""
    import shutil

    from kiln.trainer.launch import extensions_root

    built = extensions_root() / "deepspeed_shm_comm"
    ext = tmp_path / "ext"
    if (built / "deepspeed_shm_comm.so").exists():
        shutil.copytree(built, ext / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    (ext / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    res = kiln("train", small_recipe, "--set", "train.name=lock", "--set", "train.steps=2", timeout=400)
    assert f"kiln: removed {ext / 'deepspeed_shm_comm' / 'lock'}, a build lock no process holds" in res.stderr
    assert "kiln: done." in res.stdout


# Two gloo ranks trade tagged batch_isend_irecv (as TokenRing does) and end; with a plain exit,
# torch's teardown sometimes aborts ("terminate called without an active exception").
P2P_EXIT = """
import sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
x, y = torch.full((1024,), float(r)), torch.empty(1024)
for tag in range(4):
    ops = [dist.P2POp(dist.isend, x, (r + 1) % w, tag=tag), dist.P2POp(dist.irecv, y, (r - 1) % w, tag=tag)]
    for q in dist.batch_isend_irecv(ops):
        q.wait()
dist.barrier()
assert y[0].item() == (r - 1) % w
print("ok", flush=True)
from kiln.trainer.launch import exit_rank
exit_rank(0)
"""


def _p2p_exit() -> list[tuple[int, str]]:
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", P2P_EXIT], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                                       WORLD_SIZE="2", OMP_NUM_THREADS="1"))
             for r in range(2)]
    return [(p.wait(timeout=120), p.stdout.read()) for p in procs]


@pytest.mark.slow
def test_a_rank_exit_after_tagged_p2p_never_aborts():
    for trial in range(16):
        for rc, out in _p2p_exit():
            assert (rc, out) == (0, "ok\n"), f"trial {trial}: exit status {rc}: {out[-500:]}"
