"""`kiln report RUN_DIR`: a run's metrics file as a table and a loss curve in the terminal."""
import json
from pathlib import Path

BARS = "▁▂▃▄▅▆▇█"


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def sparkline(values: list[float], width: int = 60) -> str:
    """Values resampled to `width` bars, low to high."""
    if not values:
        return ""
    n = min(width, len(values))  # fewer values than bars: one bar each, the whole run
    idx = [round(i * (len(values) - 1) / max(n - 1, 1)) for i in range(n)]
    vs = [values[i] for i in idx]
    lo, hi = min(vs), max(vs)
    return "".join(BARS[round((v - lo) / (hi - lo) * (len(BARS) - 1)) if hi > lo else 0] for v in vs)


def report(run_dir: Path, metrics_file: str = "metrics.jsonl") -> str:
    """The text `kiln report` prints."""
    path = Path(run_dir) / metrics_file
    if not path.is_file():
        raise FileNotFoundError(f"no {metrics_file} in {run_dir}: is it a run directory (runs/<name>)?")
    recs = read_metrics(path)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval/loss" in r]
    lines = [f"run {run_dir}: {len(train)} train records, {len(evals)} evaluations"]
    if train:
        lines.append(f"{'step':>7} {'loss':>8} {'lr':>9} {'tok/s':>9} {'MFU':>6} {'mem GB':>7}")
        stride = max(1, len(train) // 12)
        for r in train[::stride] + ([train[-1]] if (len(train) - 1) % stride else []):
            lines.append(f"{r['step']:>7} {r['loss']:>8.4f} {r['lr']:>9.2e} {r['tokens_per_s']:>9,.0f} "
                         f"{100 * r['mfu']:>5.1f}% {r['mem_gb']:>7.2f}")
        losses = [r["loss"] for r in train]
        lines.append(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}  {sparkline(losses)}")
    for r in evals[-3:]:
        lines.append(f"eval at step {r['step']}: loss {r['eval/loss']:.4f}, ppl {r['eval/ppl']:.2f}")
    return "\n".join(lines)
