"""Checkpoint cost: how long training is blocked by a save, checkpoint.async_save against blocking
saves, on recipes/tiny.yaml and recipes/moe_tiny.yaml (short runs through the real `kiln train`,
2 CPU ranks); and what the manifest's sha256 costs. Goal: async blocks <= 0.2x of sync.

Each run saves every --every steps; the blocking time of every save but the last (a stage's last
save is always written in full before the run goes on) is read from kiln's own line
"kiln: checkpoint ... (saved in X s)" / "(... training blocked X s)". The hashing figure is the
time to sha256 every file of the final checkpoint, against that checkpoint's size.

    python bench/checkpoint.py [--steps 16] [--every 2] [--recipes tiny moe_tiny] [--keep-runs]
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^kiln: checkpoint \S+/(step_\d+) \((?:saved in|being written in the background, "
                  r"training blocked) ([0-9.]+) s\)")


def run(recipe: str, async_save: bool, steps: int, every: int, root: Path) -> tuple[list, Path]:
    """Train `recipe` briefly; the blocking seconds of each intermediate save, and the run dir."""
    name = f"{recipe}_{'async' if async_save else 'sync'}"
    cmd = [sys.executable, "-m", "kiln.trainer.cli", "train", str(ROOT / "recipes" / f"{recipe}.yaml"),
           "--set", f"train.steps={steps}", "--set", f"checkpoint.every={every}", "--set", "checkpoint.keep=0",
           "--set", "train.eval_every=0", "--set", "train.compile=off", "--set", f"train.run_root={root}",
           "--set", f"train.name={name}", "--set", "logging.wandb.mode=disabled",
           "--set", f"checkpoint.async_save={str(async_save).lower()}", "--no-resume"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    saves = [(m.group(1), float(m.group(2))) for m in map(LINE.match, out.stdout.splitlines()) if m]
    final = f"step_{steps:08d}"
    return [s for tag, s in saves if tag != final], root / name


def hash_cost(tag_dir: Path) -> tuple[float, int]:
    """Seconds to sha256 every file of a checkpoint folder, and its bytes."""
    from kiln.data.manifest import sha256_file

    files = [p for p in tag_dir.rglob("*") if p.is_file()]
    t0 = time.perf_counter()
    for p in files:
        sha256_file(p)
    return time.perf_counter() - t0, sum(p.stat().st_size for p in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=["tiny", "moe_tiny"])
    ap.add_argument("--keep-runs", action="store_true", help="leave the run directories in ./bench_runs")
    a = ap.parse_args()
    root = Path("bench_runs") if a.keep_runs else Path(tempfile.mkdtemp(prefix="kiln-ckpt-bench-"))
    print(f"{'recipe':10} {'saves':>5} {'sync s (median)':>16} {'async s (median)':>17} {'async/sync':>10} "
          f"{'ckpt MiB':>9} {'sha256 s':>9} {'hash/sync':>9}")
    for recipe in a.recipes:
        sync, run_dir = run(recipe, False, a.steps, a.every, root)
        asyn, _ = run(recipe, True, a.steps, a.every, root)
        s, q = statistics.median(sync), statistics.median(asyn)
        h, size = hash_cost(run_dir / "checkpoints" / f"step_{a.steps:08d}")
        print(f"{recipe:10} {len(sync):>5} {s:>16.4f} {q:>17.4f} {q / s:>10.2f} {size / 2**20:>9.1f} "
              f"{h:>9.4f} {h / s:>9.2f}", flush=True)
        print(f"           sync {['%.3f' % x for x in sync]}\n           async {['%.3f' % x for x in asyn]}")
    print("goal: async/sync <= 0.2")


if __name__ == "__main__":
    main()
