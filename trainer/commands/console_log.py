"""<run_dir>/console.log: what `kiln train` showed on the terminal (its own lines, rank 0's, the
ranks' relayed errors and its closing one-line error), appended run after run, so that a resumed or
requeued run keeps the whole story beside its metrics.

The ranks are separate processes that write to the file descriptors they inherit, so the copy is
made at the descriptor level: fds 1 and 2 become pipes whose reader threads write every chunk to
the terminal and to the log. Secrets never reach it through kiln: kiln prints no environment."""
import datetime
import os
import sys
import threading
from pathlib import Path

NAME = "console.log"


class ConsoleLog:
    """Context manager: while open, everything written to fds 1 and 2 also goes to `path`."""

    def __init__(self, run_dir: Path, argv=None):
        self.path = Path(run_dir) / NAME
        self.argv = sys.argv if argv is None else argv
        self._lock = threading.Lock()
        self._threads, self._saved = [], {}

    def __enter__(self):
        try:
            self._log = open(self.path, "ab")
        except OSError:
            self._log = None  # an unwritable run dir is reported by the write that needs it
            return self
        self._write(self._header())
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            t = threading.Thread(target=self._pump, args=(r, self._saved[fd]), daemon=True,
                                 name=f"kiln-console-{fd}")
            t.start()
            self._threads.append(t)
        return self

    def note(self, line: str) -> None:
        """Append `line` to the log only (for the error line the CLI prints after the tee closed)."""
        if self._log is not None:
            self._write((line.rstrip("\n") + "\n").encode(errors="replace"))

    def __exit__(self, *exc):
        if self._log is None:
            return False
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes the pipe's write end that fd held: the reader sees EOF
        for t in self._threads:  # a rank that outlives the launcher holds the pipe: do not wait on it
            t.join(timeout=5)
        for saved in self._saved.values():
            os.close(saved)
        err = exc[1]
        if err is not None and type(err).__name__ in _USER_ERRORS:
            self.note(f"kiln: error: {err}")
            err.kiln_console_logged = True
        self._log.close()
        self._log = None
        return False

    def _header(self) -> bytes:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"==== {stamp}: kiln {' '.join(self.argv[1:])}\n".encode(errors="replace")

    def _write(self, data: bytes) -> None:
        with self._lock:
            try:
                self._log.write(data)
                self._log.flush()
            except (OSError, ValueError):
                pass  # a full disk must not stop the terminal copy

    def _pump(self, r: int, terminal: int) -> None:
        with os.fdopen(r, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(terminal, view):]
                except OSError:
                    pass
                if self._log is not None:
                    self._write(chunk)


# the errors kiln.trainer.cli prints as one line (by name: this module imports none of them)
_USER_ERRORS = {"ConfigError", "DataError", "CheckpointError", "PlacementError", "InferError"}


def note_error(run_dir: Path, err: BaseException, argv=None) -> None:
    """Append the one-line user error `err` to an existing run dir's console log (a resume refused
    before the ranks started), unless the tee already wrote it; a run dir that refuses writes is
    left alone (the error line itself says so)."""
    if type(err).__name__ not in _USER_ERRORS or getattr(err, "kiln_console_logged", False):
        return
    log = ConsoleLog(run_dir, argv)
    try:
        with open(log.path, "ab") as f:
            f.write(log._header() + f"kiln: error: {err}\n".encode(errors="replace"))
    except OSError:
        pass
