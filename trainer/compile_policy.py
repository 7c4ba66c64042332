"""train.compile: on, off, or auto: compile the blocks only where the steps ahead pay for it.

torch.compile makes each step a few percent shorter but the first step pays the compile (docs/
trainer.md, "train.compile: auto"). So `auto` compiles when

    steps_left x (eager_step_s - compiled_step_s)  >  MARGIN x compile_s

`decide()` is that rule, pure. `estimate()` fills in its inputs from step times measured by
earlier runs of the same shape on the same machine (kiln.trainer.hooks.compile records them in
<data.cache_dir>/compile_times.json), or from the defaults below where nothing is recorded yet.
`choose()` is what Stage.build calls: the decision of rank 0, the same on every rank, printed.
"""
import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

CACHE_FILE = "compile_times.json"

# Defaults until this shape has been measured here, from docs/trainer.md "Measured" (2-core CPU,
# 2-rank `make train`, recipes/tiny.yaml, 60 steps, two runs each): 7.4-7.8k tokens/s eager,
# 8.0-8.2k compiled, so compiled steps are ~5% shorter (2.5-10% between the extreme runs);
# 9.4 s of compile with a cold inductor cache (1.4 s warm): assume cold, as on a first run;
# eager MFU 49-71% of the measured GEMM peak: the eager step time is estimated at 55%.
DEFAULT_GAIN = 0.05
DEFAULT_COMPILE_S = 9.4
DEFAULT_MFU = 0.55
# The saving must be 1.5x the compile time, not just above it: the gain is the difference of two
# step times that each move by a few percent with machine load (the 5% above spans 2.5-10%), so
# an estimate may be a third too high and still break even; and the measured compile time is the
# first training step's alone, while evaluation (no_grad) and a resumed run compile again.
MARGIN = 1.5
# A gain under 1% of the eager step is within the run-to-run noise of step times: no gain.
MIN_GAIN = 0.01


def inapplicable(recipe) -> str:
    """What in `recipe` torch.compile of the blocks does not support yet ('' when it applies)."""
    if recipe.parallel.sp > 1:
        return "sequence parallelism"
    if recipe.model.mlp != "swiglu":
        return "MoE (model.mlp=moe)"
    if recipe.data.packing != "concat":
        return f"data.packing={recipe.data.packing}"
    if recipe.train.activation_checkpointing != "none":  # recompute inside compiled blocks: untested
        return f"train.activation_checkpointing={recipe.train.activation_checkpointing}"
    return ""


def decide(steps_left: int, eager_step_s: float, gain_s_per_step: float, compile_s: float) -> tuple[bool, str]:
    """Whether compiling pays over `steps_left` steps, and why (with the numbers)."""
    if gain_s_per_step < MIN_GAIN * eager_step_s:
        return False, (f"compiled steps are not faster: {1e3 * gain_s_per_step:+.1f} ms of a "
                       f"{eager_step_s:.3f} s step, under the {100 * MIN_GAIN:.0f}% noise floor")
    saved = steps_left * gain_s_per_step
    pays_from = int(MARGIN * compile_s / gain_s_per_step) + 1
    why = (f"{steps_left:,} steps x {1e3 * gain_s_per_step:.1f} ms saved = {saved:.1f} s "
           f"{'>' if saved > MARGIN * compile_s else '<='} {MARGIN} x {compile_s:.1f} s of compile; "
           f"pays from {pays_from:,} steps")
    return saved > MARGIN * compile_s, why


@dataclasses.dataclass
class Estimate:
    """decide()'s inputs for one run, and where each came from ("measured" or how it was guessed)."""

    eager_step_s: float
    compiled_step_s: float
    compile_s: float
    sources: dict

    @property
    def gain_s(self) -> float:
        return self.eager_step_s - self.compiled_step_s

    def describe(self) -> str:
        s = self.sources
        return (f"eager {self.eager_step_s:.3f} s/step ({s['eager']}), compiled {self.compiled_step_s:.3f} "
                f"s/step ({s['compiled']}), compile {self.compile_s:.1f} s ({s['compile']})")


def from_record(record: dict, flop_estimate_s) -> Estimate:
    """The estimate from a cache record (any field may be missing); `flop_estimate_s()` gives the
    eager step time when neither step time was measured."""
    eager, compiled, comp = (record.get(k) for k in ("eager_step_s", "compiled_step_s", "compile_s"))
    sources = {"eager": "measured", "compiled": "measured", "compile": "measured"}
    if eager is None:
        eager, sources["eager"] = ((compiled / (1 - DEFAULT_GAIN), f"compiled + {100 * DEFAULT_GAIN:.0f}%")
                                   if compiled else (flop_estimate_s(), f"FLOPs at {100 * DEFAULT_MFU:.0f}% MFU"))
    if compiled is None:
        compiled, sources["compiled"] = eager * (1 - DEFAULT_GAIN), f"default -{100 * DEFAULT_GAIN:.0f}%"
    if comp is None:
        comp, sources["compile"] = DEFAULT_COMPILE_S, "default, cold cache"
    return Estimate(eager, compiled, comp, sources)


# ---- the measurement cache: <data.cache_dir>/compile_times.json --------------------------------

def cache_path(cache_dir) -> Path:
    return Path(cache_dir) / CACHE_FILE


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timing_key(stage) -> dict:
    """What decides a stage's step and compile times: a record is reused only when all of it matches."""
    run, t = stage.run, stage.recipe.train
    return {"device": f"{run.device.type}: {_device_name(run.device)}", "model": dataclasses.asdict(stage.model_cfg),
            "micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "seq_len": stage.recipe.data.seq_len,
            "precision": "bf16" if run.bf16 else "fp32", "zero_stage": stage.recipe.parallel.zero_stage,
            "objective": stage.recipe.objective.name, "threads": run.threads,
            "world": dist.get_world_size() if dist.is_initialized() else 1, "torch": torch.__version__}


def _slot(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _load(path: Path) -> dict:
    try:
        cache = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def read_record(path, key: dict) -> dict:
    """The measured times recorded for `key` ({} when none: no file, another key, a corrupt file)."""
    entry = _load(path).get(_slot(key))
    return entry if isinstance(entry, dict) and entry.get("key") == key else {}


def write_record(path, key: dict, times: dict) -> None:
    """Merge `times` into the record of `key`, atomically (a reader never sees half a file)."""
    path = Path(path)
    cache = _load(path)
    old = read_record(path, key)
    cache[_slot(key)] = {**old, **times, "key": key, "updated": round(time.time())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)


# ---- the decision for a stage -------------------------------------------------------------------

def steps_left(stage) -> int:
    """Steps this stage will train in this process: from its checkpoint's step if it resumes one,
    else from its first step (a stage after another starts where that one ended)."""
    index, step = stage.run.resume_point()
    return stage.end - (step if index == stage.index else stage.start)


def estimate(stage) -> Estimate:
    """decide()'s inputs for `stage` from the cache, the rest from defaults and the FLOP count."""
    from kiln.model import flops_per_token
    from kiln.trainer.monitor import peak_flops

    r, run = stage.recipe, stage.run

    def flop_estimate_s() -> float:
        # this rank's FLOPs per step over its peak (the same cached probe the monitor's MFU uses)
        tokens = r.train.micro_batch * r.train.grad_accum * r.data.seq_len
        peak = peak_flops(run.device, run.threads, r.data.cache_dir)
        return tokens * flops_per_token(stage.model_cfg, r.data.seq_len) / (peak * DEFAULT_MFU)

    return from_record(read_record(cache_path(r.data.cache_dir), timing_key(stage)), flop_estimate_s)


def choose(stage) -> bool:
    """Whether `stage` compiles its blocks (collective under auto). on/off are the user's; auto is
    rank 0's decision, sent to every rank so that all build the same model, and printed."""
    mode = stage.recipe.train.compile
    if mode != "auto":
        return mode == "on"
    why = inapplicable(stage.recipe)
    if why:  # the same on every rank: no need to ask rank 0
        on, line = False, f"eager (compile does not apply to {why} yet)"
    else:
        choice = [None]
        if dist.get_rank() == 0:
            est = estimate(stage)
            on, reason = decide(steps_left(stage), est.eager_step_s, est.gain_s, est.compile_s)
            choice = [(on, f"{'compile' if on else 'eager'} ({reason}; {est.describe()})")]
        dist.broadcast_object_list(choice, src=0)
        on, line = choice[0]
    if dist.get_rank() == 0:
        print(f"kiln: train.compile=auto: {line}", flush=True)
    return on
