"""The fuzz harness: run one `kiln` command in this process with a time limit, and sort what came
out into an outcome class. Shared by tests/fuzz/ (bounded cases) and bench/fuzz.py (many more).

Outcome classes (what a case may end in):
  accepted  - exit 0: the input was valid after all (a mutation can land on another valid value)
  refused   - exit 2 with exactly one `kiln: error:` line and no traceback: the contract
  crash     - an exception escaped kiln.trainer.cli.main (a traceback for the user), or another exit code
  noisy     - exit 2 but with several error lines, or a traceback printed
  hang      - the time limit passed
Only accepted and refused are allowed.
"""
import contextlib
import dataclasses
import io
import signal
import time
from collections import Counter

ALLOWED = ("accepted", "refused")


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so kiln's `except Exception` cannot swallow it."""


@dataclasses.dataclass
class Result:
    """One case: its name and class, the outcome, the exit code, the error line(s) and the time."""

    name: str
    kind: str
    outcome: str
    rc: int | None
    lines: list
    seconds: float
    detail: str = ""

    def describe(self) -> str:
        return f"[{self.kind}] {self.name}: {self.outcome} (rc={self.rc}) {self.detail or ' | '.join(self.lines)}"


def _on_alarm(signum, frame):
    raise Hang()


def run_main(argv, timeout_s: float = 20.0):
    """(rc or None, stdout, stderr, exception or None, seconds) of kiln.trainer.cli.main(argv) run here."""
    from kiln.trainer.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    t0, rc, exc = time.perf_counter(), None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
    except Hang as e:
        exc = e
    except SystemExit as e:  # argparse's own errors exit 2 with a usage line
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - the crash class: record it, do not stop the fuzz run
        exc = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _end_of_process()
    return rc, out.getvalue(), err.getvalue(), exc, time.perf_counter() - t0


def _end_of_process() -> None:
    """What the end of a `kiln` process does that the next in-process case must see: the run-dir locks
    kiln.trainer.run_dir holds for the life of its process are dropped."""
    import sys

    run_dir = sys.modules.get("kiln.trainer.run_dir")
    for f in getattr(run_dir, "_CLAIMS", []):
        f.close()
    if run_dir is not None:
        run_dir._CLAIMS.clear()


def classify(name: str, kind: str, rc, stdout: str, stderr: str, exc, seconds: float) -> Result:
    """The outcome class of one finished case (see the module docstring)."""
    text = stdout + stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("kiln: error:") or ln.startswith("kiln: error")]
    usage = [ln for ln in stderr.splitlines() if ln.startswith("kiln") and ": error:" in ln]
    if isinstance(exc, Hang):
        return Result(name, kind, "hang", None, errors, seconds)
    if exc is not None:
        return Result(name, kind, "crash", None, errors, seconds, f"{type(exc).__name__}: {str(exc)[:200]}")
    if rc == 0:
        return Result(name, kind, "accepted", 0, [], seconds)
    if "Traceback (most recent call last)" in text:
        return Result(name, kind, "noisy", rc, errors, seconds, "a traceback was printed")
    if rc == 2 and (len(errors) == 1 or (not errors and len(usage) == 1)):
        return Result(name, kind, "refused", 2, errors or usage, seconds)
    if rc == 2:
        return Result(name, kind, "noisy", rc, errors, seconds, f"{len(errors)} error lines")
    return Result(name, kind, "crash", rc, errors, seconds, f"exit {rc}: {text[-300:]}")


def run_case(name: str, kind: str, argv, timeout_s: float = 20.0) -> Result:
    """Run and classify one case."""
    return classify(name, kind, *run_main(argv, timeout_s))


def tally(results) -> dict:
    """{kind: {outcome: count}} and a total, for printing and for docs/reliability_inputs.md."""
    by_kind: dict = {}
    for r in results:
        by_kind.setdefault(r.kind, Counter())[r.outcome] += 1
    return {k: dict(v) for k, v in sorted(by_kind.items())}


def report(results) -> str:
    """A table: one row per input class, its case count and outcome counts."""
    rows = [f"{'class':<22} {'cases':>5}  outcomes"]
    for kind, outcomes in tally(results).items():
        rows.append(f"{kind:<22} {sum(outcomes.values()):>5}  " +
                    ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items())))
    total = Counter(r.outcome for r in results)
    rows.append(f"{'total':<22} {len(results):>5}  " + ", ".join(f"{o} {n}" for o, n in sorted(total.items())))
    return "\n".join(rows)


def failures(results) -> list:
    """The cases outside the allowed outcome classes, described."""
    return [r.describe() for r in results if r.outcome not in ALLOWED]
