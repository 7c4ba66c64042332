"""Metrics: console progress, runs/<name>/metrics.jsonl and Weights & Biases (rank 0 only)."""
import json
import os
import resource
import secrets
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s by GPU name fragment (vendor datasheets).
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
             "V100": 125e12, "RTX 4090": 165e12, "L4": 121e12}


def measure_cpu_peak(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of a few fp32 n x n GEMMs on this many threads (the CPU's MFU peak)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(old)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, threads: int, cache_dir: str) -> float:
    """Peak FLOP/s of one rank: a table for GPUs, a cached GEMM probe for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAKS.items() if k in name), 989e12)
    path = Path(cache_dir) / "cpu_peak.json"
    key = f"threads={threads}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure_cpu_peak(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    return cache[key]


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class Monitor:
    """Writes every record to the metrics file and W&B; prints a progress line."""

    def __init__(self, run_dir: Path, recipe, recipe_dict: dict, total_steps: int, enabled: bool,
                 resume_step: int = 0):
        self.enabled = enabled
        self.total = total_steps
        self.path = run_dir / recipe.logging.metrics_file
        self.wandb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        if recipe.logging.wandb.mode != "disabled":
            self.wandb = _start_wandb(run_dir, recipe, recipe_dict)

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old records."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict, line: str | None = None) -> None:
        """Append `record` (must contain "step"); print `line` if given."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", "time")},
                           step=record["step"])
        if line:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, recipe, recipe_dict: dict):
    """Start (or continue, with the stored id) the run's W&B run."""
    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    w = recipe.logging.wandb
    mode = w.mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        print("kiln: logging.wandb.mode=online but WANDB_API_KEY is not set; logging offline instead")
        mode = "offline"
    return wandb.init(project=w.project, entity=w.entity or None, group=w.group or None,
                      name=recipe.train.name, id=run_id,
                      resume="allow", mode=mode, dir=str(run_dir), config=recipe_dict,
                      settings=wandb.Settings(silent=True, console="off"))


def fmt_eta(seconds: float) -> str:
    """h:mm:ss."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
