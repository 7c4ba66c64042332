"""Starting ranks: local processes through torch's elastic launcher, or joining a launched world.

A world is "already launched" when torchrun / the DeepSpeed launcher set RANK and WORLD_SIZE,
or when srun started the tasks (SLURM_PROCID inside a job step, kiln.slurm.env); then this
process is one rank.
"""
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from kiln.slurm.env import adopt_slurm_env  # srun's variables -> torch.distributed's (slurm/env.py)


def in_launched_world() -> bool:
    """True when this process is already one rank of a world started by a launcher."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or adopt_slurm_env()


def check_cuda(ranks: int) -> None:
    """train.device=cuda needs a GPU for each of this node's `ranks` ranks; one clear line if not."""
    import torch

    from kiln.trainer.config import ConfigError

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ConfigError(f"train.device=cuda but no CUDA GPU is visible (torch {torch.__version__}, "
                          f"{build}): run on a GPU node, or --set train.device=cpu")
    if have < ranks:
        raise ConfigError(f"train.nproc={ranks} needs {ranks} GPUs on this node, {have} visible: "
                          f"--nproc {have} (or set CUDA_VISIBLE_DEVICES)")


def pick_device(recipe):
    """cuda:<local rank> when asked for (or auto and available), else cpu."""
    import torch

    want = recipe.train.device
    if want == "cuda":
        check_cuda(1)
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(device, timeout_s: float = 600.0) -> None:
    """NCCL on GPUs, gloo on CPUs: the only difference between the two paths."""
    import contextlib
    import datetime
    import io

    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        said = io.StringIO()
        with contextlib.redirect_stdout(said):  # on CPU every rank prints that its shm op built
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       timeout=datetime.timedelta(seconds=timeout_s))
        for line in said.getvalue().splitlines():
            if not line.endswith("built successfully"):
                print(line, flush=True)


def extensions_root() -> Path:
    """The folder torch JIT-builds C++ extensions into (DeepSpeed's shm comm op on CPU):
    TORCH_EXTENSIONS_DIR, else torch's default build root and a py<ver>_<accelerator> folder, as
    torch.utils.cpp_extension._get_build_directory names them. Worked out without importing torch
    (the parent process runs this before every launch): the build root is torch's user cache dir
    (XDG_CACHE_HOME or ~/.cache, then torch_extensions) and the accelerator is read from the
    installed torch/version.py."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    version = _torch_version_info()
    acc = (f"rocm{version['hip'].replace('.', '')}" if version.get("hip") else
           f"cu{version['cuda'].replace('.', '')}" if version.get("cuda") else "cpu")
    root = os.path.realpath(os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                         "torch_extensions"))
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{acc}"


def _torch_version_info() -> dict:
    """torch.version's values (cuda, hip, ...) from the installed file, without importing torch."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    values: dict = {}
    if spec and spec.submodule_search_locations:
        exec(Path(spec.submodule_search_locations[0], "version.py").read_text(), values)  # noqa: S102 (torch's own file)
    return values


def lock_holders(lock: Path) -> list[int] | None:
    """The processes that hold `lock` open (torch's FileBaton keeps its file open while it builds),
    from /proc; None when a Python process's files cannot be read (then kiln cannot tell)."""
    target, holders, unknown = str(lock.resolve()), [], False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                holders.append(int(proc.name))
        except FileNotFoundError:  # the process ended meanwhile
            continue
        except PermissionError:  # another user's process (or a sandbox's init): a builder only if Python's
            try:
                unknown = unknown or b"python" in (proc / "cmdline").read_bytes()
            except OSError:
                pass
    return holders if holders or not unknown else None


def clear_stale_build_locks(root: Path | None = None) -> list[str]:
    """Before the ranks start: a build of a JIT extension that was interrupted (Ctrl-C during the
    first DeepSpeed op build) leaves torch's `lock` file behind, and every later build waits on it
    forever, silently. Remove each lock no live process holds; name the others. One line each."""
    root = extensions_root() if root is None else root
    said = []
    for lock in sorted(root.glob("*/lock")):
        holders = lock_holders(lock)
        if holders == []:
            lock.unlink(missing_ok=True)
            said.append(f"kiln: removed {lock}, a build lock no process holds (a build of {lock.parent.name} "
                        "was interrupted): the op builds again")
        elif holders is None:
            said.append(f"kiln: warning: {lock} (a lock of torch's extension build) exists and kiln cannot tell "
                        f"whether a build holds it; if the ranks wait with no output and no build runs, remove it")
        else:
            said.append(f"kiln: process {holders[0]} is building {lock.parent.name} (it holds {lock}); the ranks "
                        "wait for it")
    return said


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, run_dir: Path, data_dir: Path, device: str = "auto") -> int:
    """Run `nproc` ranks of kiln.trainer.worker on this machine under torchrun; its exit code."""
    for line in clear_stale_build_locks():  # DeepSpeed JIT-builds ops (on CPU, its shm comm op)
        print(line, file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "kiln.trainer.torchrun", f"--nproc-per-node={nproc}",
           "--nnodes=1", f"--master-port={_free_port()}", "--master-addr=127.0.0.1",
           "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",  # not SIGTERM: relay_stop_signals passes it on
           "-m", "kiln.trainer.worker", "--run-dir", str(run_dir), "--data-dir", str(data_dir)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu" or (device == "auto" and not cuda_available()):
        env.setdefault("DS_ACCELERATOR", "cpu")  # else every rank warns that it fell back to CPU
    env["KILN_PARENT_PID"] = str(os.getpid())
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    relay = _Relay()
    # SIGTERM / SIGUSR1 (a preemption, `kill`, `timeout`): passed on to torchrun, which passes them
    # to the ranks (kiln.trainer.torchrun); they checkpoint at the end of the step and exit cleanly
    before = {s: signal.signal(s, lambda signum, frame: _send(proc.pid, signum)) for s in STOP_SIGNALS}
    try:
        while True:
            try:
                relay.pump(proc.stderr)
                break
            except KeyboardInterrupt:  # torchrun forwards the signal to the ranks; keep draining
                relay.interrupted = True
        rc = proc.wait()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    from kiln.trainer.checkpoint import latest_tag

    tag = latest_tag(run_dir)
    return relay.finish(rc, f"the newest checkpoint, {tag}, is kept" if tag else "no checkpoint was saved yet")


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch where no GPU driver is installed (no
    /dev/nvidiactl, /dev/nvidia0 or /dev/kfd): the CLI's parent process then never loads torch."""
    if not any(os.path.exists(f"/dev/{node}") for node in ("nvidiactl", "nvidia0", "kfd")):
        return False
    import torch

    return torch.cuda.is_available()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # checkpoint at the end of the step, then exit


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc; Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the name: ppid
                out.append(int(entry.name))
    return out


def relay_stop_signals() -> None:
    """In torchrun's process: pass SIGTERM and SIGUSR1 on to the ranks (its children) instead of
    stopping them, so that they stop at a step boundary after a checkpoint (hooks/stop.py) and
    torchrun ends when they do. torchrun's own SIGTERM handler kills the ranks after 30 s; it is
    told to leave SIGTERM alone (launch_local's --signals-to-handle). SIGINT, SIGHUP and SIGQUIT
    keep torchrun's handling."""
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: [_send(c, signum) for c in children(os.getpid())])


def die_with_parent(parent: int, sig: int = signal.SIGHUP) -> None:
    """Ask for `sig` when the parent process `parent` dies (kill -9, OOM killer), so that torchrun
    stops its ranks instead of leaving them training on unsupervised (Linux only). Set in the child
    itself rather than by Popen's preexec_fn, which can deadlock in a parent with threads. SIGHUP,
    not SIGTERM: torchrun passes SIGTERM on to the ranks as a request to checkpoint and stop."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), sig)


def exit_rank(rc: int) -> None:
    """End this rank now with exit status `rc`, its work done (the run's last barrier passed, the
    metrics and the last checkpoint written) and its output flushed, skipping the interpreter's
    teardown: there, after tagged batch_isend_irecv on gloo (TokenRing), torch's process-group
    threads are destroyed in an order that sometimes aborts the process ("terminate called
    without an active exception", SIGABRT), plain torch too; kiln's exit status must not depend
    on it. Only for a process that is one rank (kiln.trainer.worker). os._exit runs no atexit
    handler, so a background checkpoint still being written (checkpoint.async_save, a stop on a
    signal) is finished here first."""
    from kiln.trainer import checkpoint_async

    try:
        checkpoint_async.wait()
    except Exception as e:  # noqa: BLE001 - its failure is this rank's last word
        sys.stderr.write(f"kiln: error: the last checkpoint was not saved: {e}\n")
        rc = rc or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


def watch_parent(interval: float = 0.1) -> None:
    """In a rank that torchrun started: exit at once when torchrun is gone. torchrun starts each
    rank in a session of its own, so killing the launcher's process group misses the ranks, and
    an orphaned rank would train on and write checkpoints beside a resumed run."""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="kiln-parent-watch", daemon=True).start()


class _Relay:
    """Passes the ranks' stderr through as it comes, each distinct `kiln: error:` line once (every
    rank may report the same user error). torchrun's own failure report (its traceback and a
    table of the ranks), a rank's traceback, and anything after either or after a rank's error
    line, is held back: shown at the end only if no rank's error line and no killing signal
    explains the failure."""

    REPORT = re.compile(r"^E\d{4} .*failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
    # a rank's uncaught exception (torch prefixes it): when a peer was killed it is the survivor's
    # lost connection, shown only if no signal explains the failure
    RANK_TRACEBACK = re.compile(r"^\[rank\d+\]: Traceback")
    STOPPING = re.compile(r"^W\d{4} .*closing signal")  # torchrun stopping the other ranks: the start of its report
    HINTS = {"SIGKILL": "the out-of-memory killer does this: check `dmesg`, then lower train.micro_batch "
                        "or run fewer ranks",
             "SIGSEGV": "a crash in native code", "SIGBUS": "a crash in native code (or /dev/shm full)",
             "SIGABRT": "a crash in native code"}

    def __init__(self):
        self.errors, self.held = [], []
        self.interrupted = False  # Ctrl-C: what torchrun and the ranks print while stopping is noise

    def pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            if line.startswith("kiln: error:"):
                if line not in self.errors:
                    self.errors.append(line)
                    self._write(line)
            elif self.held or self.interrupted or self.errors or self.REPORT.match(line) \
                    or self.STOPPING.match(line) or self.RANK_TRACEBACK.match(line):
                # after a rank's error line what follows is shutdown noise (torchrun stopping the
                # other ranks, its report); it is shown only if the run ends with no error line
                self.held.append(line)
            else:
                self._write(line)

    def finish(self, rc: int, kept: str = "") -> int:
        """The exit code for `kiln train`: 2 after a user error, 130 after Ctrl-C. A rank killed by
        a signal (the OOM killer, a native crash) prints no word of its own: one line says which
        and what `kept` (the checkpoint a rerun resumes from), instead of torchrun's traceback."""
        if rc != 0 and self.errors:
            return 2  # the ranks said what to fix
        if self.interrupted:
            return 130
        first = next((m for m in map(self.REPORT.match, self.held) if m), None)  # torchrun's root cause
        if rc != 0 and first and int(first[1]) < 0:
            try:
                sig = signal.Signals(-int(first[1])).name
            except ValueError:
                sig = f"signal {-int(first[1])}"
            hint = f" ({self.HINTS[sig]})" if sig in self.HINTS else ""
            self._write(f"kiln: error: rank {first[2]} was killed by {sig}{hint}; {kept or 'see above'}: "
                        "run the same command to resume\n")
            return rc
        self._write("".join(self.held))
        return rc

    @staticmethod
    def _write(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()
