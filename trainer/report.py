"""`kiln report RUN_DIR`: a run's metrics file as a table and a loss curve in the terminal.

The plots and the HTML page (`--out DIR`) are trainer/report_plots.py and trainer/report_html.py;
this module reads the runs for both and keeps the text for terminals.
"""
from pathlib import Path

from kiln.trainer.config import ConfigError
from kiln.trainer.metrics import read_metrics

__all__ = ["BARS", "read_metrics", "sparkline", "load_run", "report", "table"]

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """Values resampled to `width` bars, low to high."""
    if not values:
        return ""
    n = min(width, len(values))  # fewer values than bars: one bar each, the whole run
    idx = [round(i * (len(values) - 1) / max(n - 1, 1)) for i in range(n)]
    vs = [values[i] for i in idx]
    lo, hi = min(vs), max(vs)
    return "".join(BARS[round((v - lo) / (hi - lo) * (len(BARS) - 1)) if hi > lo else 0] for v in vs)


def load_run(run_dir, metrics_file: str = "metrics.jsonl") -> list[dict]:
    """The records of a run directory in today's metric names; a user error if there are none."""
    run_dir = Path(run_dir)
    path = run_dir / metrics_file
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder: give a run directory (runs/<name>)")
    if not path.is_file():
        raise ConfigError(f"no {metrics_file} in {run_dir}: is it a run directory (runs/<name>)?")
    recs = read_metrics(path)
    if not recs:
        raise ConfigError(f"{path} holds no records: the run wrote no metrics yet "
                          f"(train.log_every steps write the first)")
    return recs


def _num(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    """A table cell; a name missing from an old or partial record prints as '-'."""
    v = r.get(key)
    return "-" if v is None else format(scale * v, fmt)


def table(run_dir, recs: list[dict]) -> str:
    """The text `kiln report` prints for one run's records."""
    train = [r for r in recs if "train/loss" in r]
    evals = [r for r in recs if "eval/loss" in r]
    lines = [f"run {run_dir}: {len(train)} train records, {len(evals)} evaluations"]
    if train:
        lines.append(f"{'step':>7} {'loss':>8} {'lr':>9} {'tok/s':>9} {'MFU':>6} {'mem GB':>7}")
        stride = max(1, len(train) // 12)
        for r in train[::stride] + ([train[-1]] if (len(train) - 1) % stride else []):
            lines.append(f"{r['step']:>7} {r['train/loss']:>8.4f} {_num(r, 'train/lr', '>9.2e')} "
                         f"{_num(r, 'perf/tokens_per_s', '>9,.0f')} {_num(r, 'perf/mfu_pct', '>5.1f')}% "
                         f"{_num(r, 'perf/mem_peak_gb', '>7.2f')}")
        losses = [r["train/loss"] for r in train]
        lines.append(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}  {sparkline(losses)}")
    for r in evals[-3:]:
        lines.append(f"eval at step {r['step']}: loss {r['eval/loss']:.4f}, ppl {r['eval/ppl']:.2f}")
    return "\n".join(lines)


def report(run_dir: Path, metrics_file: str = "metrics.jsonl") -> str:
    """The text `kiln report RUN_DIR` prints."""
    return table(run_dir, load_run(run_dir, metrics_file))
