"""Metrics: console progress, runs/<name>/metrics.jsonl and Weights & Biases (rank 0 only)."""
import json
import os
import resource
import time
from pathlib import Path

import torch

# Dense peak FLOP/s per GPU name fragment and precision (vendor datasheets; fp32 = CUDA cores,
# no TF32). Unknown parts are probed like CPUs.
GPU_PEAKS = {"H200": {"bf16": 989e12, "fp32": 67e12}, "H100": {"bf16": 989e12, "fp32": 67e12},
             "A100": {"bf16": 312e12, "fp32": 19.5e12}, "L40S": {"bf16": 362e12, "fp32": 91.6e12},
             "A10": {"bf16": 125e12, "fp32": 31.2e12}, "RTX 4090": {"bf16": 165e12, "fp32": 82.6e12},
             "L4": {"bf16": 121e12, "fp32": 30.3e12}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_peak(device: torch.device, threads: int, dtype: str = "fp32", n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of a few n x n GEMMs in `dtype` on this many threads (the MFU peak of
    a CPU, or of a GPU kiln has no datasheet figure for). The GEMM is F.linear, the op the model
    runs: on CPUs without bf16 units a bf16 `a @ b` takes a reference path ~20x slower than
    linear's, and a peak probed with it put a bf16 run at 600% MFU."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, device=device).to(DTYPES[dtype]) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gemm = torch.nn.functional.linear
    gemm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        gemm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(old)
    return 2 * n ** 3 / best


def peak(device: torch.device, threads: int, cache_dir: str, dtype: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s of one rank in `dtype`, where the figure comes from): the datasheet for known
    GPUs, else a GEMM probe cached in <cache_dir>/cpu_peak.json per device, threads and dtype."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        part = next((k for k in GPU_PEAKS if k in name), None)
        if part is not None:
            return GPU_PEAKS[part][dtype], f"{part} {dtype} datasheet"
    path = Path(cache_dir) / "cpu_peak.json"
    # the fp32 CPU key is the one earlier versions wrote: their cached probes stay valid
    key = f"threads={threads}" + ("" if (dtype, name) == ("fp32", "cpu") else f",{dtype},{name}")
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure_peak(device, threads, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    return cache[key], f"probed {dtype} GEMM on {name}, {threads} threads"


def peak_flops(device: torch.device, threads: int, cache_dir: str, dtype: str = "fp32") -> float:
    """Peak FLOP/s of one rank in `dtype` (see `peak`)."""
    return peak(device, threads, cache_dir, dtype)[0]


def window_peak_gb(device: torch.device) -> float:
    """Peak memory of this process since the previous call: the CUDA allocator's peak, or the
    resident-set high-water mark on CPU (Linux lets a process reset it; elsewhere it is the
    peak since start)."""
    if device.type == "cuda":
        gb = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(device)
        return gb
    try:
        status = Path("/proc/self/status").read_text()
        kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the high-water mark to the current RSS
        return kib / 2 ** 20
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class Monitor:
    """Writes every record to the metrics file and W&B; prints a progress line."""

    def __init__(self, run_dir: Path, recipe, recipe_dict: dict, total_steps: int, enabled: bool,
                 resume_step: int = 0, checkpoint_state: dict | None = None):
        self.enabled = enabled
        self.total = total_steps
        self.path = run_dir / recipe.logging.metrics_file
        self.wandb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        if recipe.logging.wandb.mode != "disabled":
            from kiln.trainer.wandb_log import WandbLog

            self.wandb = WandbLog(run_dir, recipe, recipe_dict, checkpoint_state)

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old records."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict, line: str | None = None) -> None:
        """Append `record` (must contain "step"); print `line` if given."""
        if not self.enabled:
            return
        record = {"step": record["step"], "time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.log_wandb({k: v for k, v in record.items() if k not in ("step", "time")}, record["step"])
        if line:
            print(line, flush=True)

    def log_wandb(self, values: dict, step: int) -> None:
        """W&B alone (media such as heatmaps that the metrics file does not hold)."""
        if self.wandb is not None:
            self.wandb.log(values, step)

    def state_dict(self) -> dict:
        """Checkpoint part: the W&B run id and row counter (rank 0; {} elsewhere)."""
        return {"wandb": self.wandb.state_dict()} if self.wandb is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing: the monitor starts before the engine loads, from kiln_state.json (Run.open_monitor)."""

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0  # a torn line of a killed run: kept, and skipped by the readers


def fmt_eta(seconds: float) -> str:
    """h:mm:ss."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
