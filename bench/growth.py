"""G_stack against training from scratch, on the embedded corpus, through the real `kiln train`.

Same target model (8 layers), same total tokens, same data stream for every run; G_stack trains
a 2-layer model (target / 4) for a fraction of the budget, stacks it 4x and continues. Growth
points sweep --fractions; the function-preserving `zero` operator runs at the best one. Loss is
smoothed (moving average over --smooth steps) and compared on tokens and on FLOPs, the small
model's included. Reports, per configuration, mean and spread over --seeds seeds:
  * tokens (and FLOPs) to reach the scratch run's final smoothed loss, as a ratio to scratch's
    whole budget (goal: <= 0.7, the paper's 7B figure is ~0.65);
  * the final smoothed loss.
Writes an SVG of loss against tokens (mean over seeds) with --plot.

    python bench/growth.py [--steps 300] [--seeds 3] [--fractions 0.1,0.25,0.5] [--plot docs/growth_loss.svg]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """
model: {{dim: {dim}, n_layers: 8, n_heads: 4, n_kv_heads: 2}}
data: {{source: stdlib, vocab_size: 2048, seq_len: 128, max_documents: 2000, cache_dir: {cache}}}
train: {{steps: {steps}, micro_batch: 8, nproc: 2, log_every: 1, eval_every: 0, eval_batches: 4,
        run_root: {runs}, seed: {seed}}}
logging: {{wandb: {{mode: disabled}}}}
checkpoint: {{every: 0, keep: 1}}
optim: {{lr: 0.002}}
schedule: {{warmup_steps: 10}}
"""


def run(home: Path, name: str, seed: int, args, growth: dict | None) -> list[dict]:
    """One `kiln train`; its train records."""
    text = RECIPE.format(dim=args.dim, cache=home / "cache", runs=home / "runs", steps=args.steps, seed=seed)
    if growth:
        text += "growth: " + json.dumps(growth) + "\n"
    recipe = home / f"{name}.yaml"
    recipe.write_text(text)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-m", "kiln.trainer.cli", "train", str(recipe), "--no-resume"],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    from kiln.trainer.metrics import read_metrics

    return [r for r in read_metrics(home / "runs" / name / "metrics.jsonl") if "train/loss" in r]


def smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def to_reach(recs: list[dict], target: float, key: str, k: int) -> float | None:
    """`key` (tokens or flops) at the first step whose smoothed loss is <= target, or None."""
    for r, s in zip(recs, smooth([r["train/loss"] for r in recs], k)):
        if s <= target:
            return r[key]
    return None


def svg(curves: dict, width=720, height=360) -> str:
    """Loss (y) against tokens (x), one polyline per configuration."""
    xs = [x for c in curves.values() for x, _ in c]
    ys = [y for c in curves.values() for _, y in c]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    colours = ["#000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="#fff"/>']
    px = lambda x: 50 + (x - x0) / (x1 - x0 or 1) * (width - 70)  # noqa: E731
    py = lambda y: 20 + (y1 - y) / (y1 - y0 or 1) * (height - 60)  # noqa: E731
    for i, (name, c) in enumerate(curves.items()):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in c)
        out.append(f'<polyline fill="none" stroke="{colours[i % 6]}" stroke-width="1.5" points="{pts}"/>')
        out.append(f'<text x="{width - 230}" y="{30 + 16 * i}" fill="{colours[i % 6]}">{name}</text>')
    out.append(f'<text x="50" y="{height - 12}">tokens {x0:,.0f} .. {x1:,.0f}; smoothed train loss '
               f'{y0:.2f} .. {y1:.2f} (mean over seeds)</text></svg>')
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--smooth", type=int, default=25)
    ap.add_argument("--plot", help="write an SVG of loss against tokens here")
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    k = args.smooth
    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        results = {}  # config -> [records per seed]
        for seed in range(args.seeds):
            results.setdefault("scratch", []).append(run(home, f"scratch{seed}", seed, args, None))
            for f in fractions:
                results.setdefault(f"stack@{f}", []).append(
                    run(home, f"stack{f}_{seed}", seed, args, {"op": "stack", "factor": 4, "at_tokens": f}))
        budget = results["scratch"][0][-1]["tokens"]

        def ratios(name, key):
            out = []
            for seed, recs in enumerate(results[name]):
                scratch = results["scratch"][seed]
                target = smooth([r["train/loss"] for r in scratch], k)[-1]
                got = to_reach(recs, target, key, k)
                out.append(float("inf") if got is None else got / scratch[-1][key])
            return out

        best = min(fractions, key=lambda f: statistics.mean(ratios(f"stack@{f}", "tokens")))
        for seed in range(args.seeds):
            results.setdefault(f"zero@{best}", []).append(
                run(home, f"zero{seed}", seed, args, {"op": "zero", "factor": 4, "at_tokens": best}))
    print(f"target: 8 layers x dim {args.dim}, {args.steps} steps x {budget // args.steps:,} tokens "
          f"= {budget:,} tokens; {args.seeds} seeds; loss smoothed over {k} steps")
    print(f"{'config':<14}{'tokens to scratch loss':>24}{'FLOPs to scratch loss':>24}{'final loss':>16}")
    for name, runs in results.items():
        t, f = ratios(name, "tokens"), ratios(name, "flops")
        final = [smooth([r["train/loss"] for r in recs], k)[-1] for recs in runs]

        def ms(v):
            return (f"{statistics.mean(v):.3f} +- {statistics.pstdev(v):.3f}" if all(x != float("inf") for x in v)
                    else f"not reached ({sum(x == float('inf') for x in v)}/{len(v)})")
        print(f"{name:<14}{ms(t):>24}{ms(f):>24}{statistics.mean(final):>10.4f} +- {statistics.pstdev(final):.4f}")
    gst = statistics.mean(ratios(f"stack@{best}", "tokens"))
    print(f"best G_stack point {best}: {gst:.2f}x the scratch tokens to reach its final loss (goal <= 0.7)")
    if args.plot:
        curves = {}
        for name, runs in results.items():
            n = min(len(r) for r in runs)
            mean = [statistics.mean(smooth([r["train/loss"] for r in recs], k)[i] for recs in runs) for i in range(n)]
            curves[name] = [(runs[0][i]["tokens"], mean[i]) for i in range(n)]
        Path(args.plot).write_text(svg(curves))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
