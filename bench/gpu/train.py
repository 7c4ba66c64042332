"""Part 3: training through the real `kiln train` on one GPU, and the same model in HF's loop.

gpt2_small.yaml on 1 rank (NCCL, world size 1, bf16), the MoE recipe shrunk to 1 rank, each for
a short run; figures from the run's own metrics.jsonl: tokens/s (median over the log windows
after the first, which holds the compile), MFU against the GEMM peak measured here, peak memory,
and the loss falling. Then LlamaForCausalLM of the same shape (bench/throughput.py's loop).
"""
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"train.nproc": 1, "train.eval_every": 0, "train.eval_batches": 1, "checkpoint.every": 0,
          "checkpoint.keep": 1, "logging.wandb.mode": "disabled"}
GPU_RUNS = {
    "gpt2_small": ("recipes/gpt2_small.yaml", {"train.steps": 100, "train.log_every": 10,
                                               "schedule.warmup_steps": 10, "train.compile": "on"}),
    # 16 layers of 64 experts sharded over 8 GPUs, shrunk to what one GPU trains in a minute
    "moe_1gpu": ("recipes/moe_gpu.yaml", {"parallel.ep": 1, "parallel.placement": "contiguous",
                                          "parallel.profile_every": 0, "model.n_layers": 4, "train.steps": 40,
                                          "train.log_every": 10, "schedule.warmup_steps": 5}),
}
TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "data.vocab_size": 512,
        "data.seq_len": 64, "data.max_documents": 30, "train.micro_batch": 4, "train.steps": 4,
        "train.log_every": 2, "train.device": "cpu", "train.compile": "off", "schedule.warmup_steps": 1,
        "optim.lr": 3e-3}  # a rate at which 4 steps of a tiny model lower the loss visibly
DRY_RUNS = {"gpt2_small": ("recipes/gpt2_small.yaml", TINY),
            "moe_1gpu": ("recipes/moe_gpu.yaml", {**GPU_RUNS["moe_1gpu"][1], **TINY, "model.moe.num_experts": 4,
                                                  "model.moe.expert_ffn_dim": 64})}


def _sets(values: dict) -> list:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def prepare_command(work: Path, max_docs: int) -> list:
    """`kiln prepare` of gpt2_small's data into the check's cache (started early, in the background)."""
    return [sys.executable, "-m", "kiln.trainer.cli", "prepare", "recipes/gpt2_small.yaml",
            *_sets({"data.cache_dir": work / "cache", "data.max_documents": max_docs})]


def kiln_train(name, recipe, sets, work: Path, timeout_s: float, env) -> tuple[dict, str]:
    """Run `kiln train`; (the run's metrics summary, its output)."""
    sets = {**COMMON, "train.name": name, "train.run_root": work / "runs", "data.cache_dir": work / "cache", **sets}
    cmd = [sys.executable, "-m", "kiln.trainer.cli", "train", recipe, "--no-resume", *_sets(sets)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout_s, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher, torchrun and the rank
        out, _ = proc.communicate()
        rc = "timeout"
    summary = summarize(work / "runs" / name / "metrics.jsonl")
    summary["rc"] = rc
    summary["compile"] = next((ln.split("train.compile=auto: ")[-1] for ln in out.splitlines()
                               if "train.compile" in ln), sets.get("train.compile"))
    return summary, out


def summarize(path: Path) -> dict:
    """Figures from a run's metrics.jsonl (empty-handed when the run logged nothing)."""
    from kiln.trainer.metrics import read_metrics

    recs = read_metrics(path) if path.exists() else []
    win = [r for r in recs if "perf/tokens_per_s" in r]
    if not win:
        return {"steps": 0}
    steady = win[1:] or win
    last = win[-1]
    return {"steps": last["step"], "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
            "flops_per_token": last["train/flops"] / last["train/tokens"],
            "mem_gb": max(r["perf/mem_peak_gb"] for r in win),
            "loss_first": win[0]["train/loss"], "loss_last": last["train/loss"],
            "loss_falling": last["train/loss"] < win[0]["train/loss"],
            "mfu_logged": statistics.median(r["perf/mfu_pct"] for r in steady) / 100,
            "step_s": statistics.median(r["perf/step_s"] for r in steady)}


def hf_loop(recipe: str, sets: dict, dev, steps: int) -> dict:
    """LlamaForCausalLM of the recipe's model shape in bench/throughput.py's loop: s/step (median,
    synchronised), tokens/s, peak memory, loss first -> last."""
    sys.path.insert(0, str(ROOT / "bench"))
    import throughput  # noqa: E402  (bench/throughput.py: the CPU kiln-vs-HF bench)
    from kiln.trainer.config import load_recipe

    r = load_recipe(ROOT / recipe, [f"{k}={v}" for k, v in sets.items()])
    cfg = r.model
    if not cfg.vocab_size:
        cfg.vocab_size = -(-r.data.vocab_size // 64) * 64  # kiln's rule for a trained tokenizer
    batch, seq = r.train.micro_batch, r.data.seq_len
    batches = [(x.to(dev), y.to(dev)) for x, y in throughput.synthetic_batches(steps + 3, batch, seq, cfg.vocab_size)]
    step = throughput.run_hf(cfg, batches, r.optim.lr, device=dev, bf16=dev.type == "cuda")
    if step is None:
        return {"skipped": "transformers is not installed"}

    def synced(x, y):
        step(x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = throughput.time_interleaved({"hf": synced}, batches, warmup=3)["hf"]
    out = {"s_per_step": sec, "tokens_per_s": batch * seq / sec, "tokens_per_step": batch * seq}
    if dev.type == "cuda":
        out["mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def run(report, budget, dev, dry: bool, work: Path, env, prep, peak: float, need_s: dict, max_docs: int) -> None:
    """Part 3 into report['train']: the kiln runs, then HF's loop beside gpt2_small."""
    report.part("train")
    # on the GPU every run trains on the documents the background `kiln prepare` tokenised
    runs = DRY_RUNS if dry else {k: (r, {"data.max_documents": max_docs, **s}) for k, (r, s) in GPU_RUNS.items()}
    if prep is not None:  # the background `kiln prepare` of gpt2_small's data
        try:
            prep.wait(timeout=max(1, budget.left() - need_s["kiln"]))
        except subprocess.TimeoutExpired:
            report.note("train", "kiln prepare still running at the budget's edge; the runs prepare themselves")
    skipped = []
    for name, (recipe, sets) in runs.items():
        if dry and name != "gpt2_small":  # one tiny run exercises kiln_train; the rest is checked as a recipe
            report.add("train", _validated(name, recipe, sets))
            continue
        if not budget.allows(need_s["kiln"]):
            skipped.append(name)
            continue
        summary, out = kiln_train(name, recipe, sets, work, budget.left() - need_s["reserve"], env)
        (work / f"{name}.log").write_text(out)
        if summary.get("tokens_per_s"):
            summary["mfu_measured_peak"] = summary["tokens_per_s"] * summary["flops_per_token"] / peak
        summary.update(run=name, recipe=recipe, overrides={k: str(v) for k, v in sets.items()},
                       ok=summary["rc"] == 0 and bool(summary.get("loss_falling")))
        if summary["rc"] != 0:
            summary["output_tail"] = out[-2000:]
        report.add("train", summary)
        print(f"  kiln {name:<12} rc {summary['rc']} steps {summary['steps']} "
              f"{summary.get('tokens_per_s', 0):,.0f} tok/s MFU {100 * summary.get('mfu_measured_peak', 0):.1f}% "
              f"(measured peak) mem {summary.get('mem_gb', 0):.2f} GB loss {summary.get('loss_first', 0):.3f} -> "
              f"{summary.get('loss_last', 0):.3f}", flush=True)
        if summary["rc"] != 0:
            print(out[-1500:], flush=True)
        if name == "gpt2_small":
            _hf_beside(report, budget, dev, recipe, sets, summary, need_s["hf"], 8 if dry else 30)
    report.finish("train", "partial" if skipped else "ran",
                  f"skipped for the time budget: {', '.join(skipped)}" if skipped else "")


def _validated(name, recipe, sets) -> dict:
    """The run's recipe with its overrides, loaded and validated as `kiln train` would (dry run)."""
    from kiln.trainer.config import load_recipe
    try:
        load_recipe(ROOT / recipe, [f"{k}={v}" for k, v in {**COMMON, **sets}.items()])
        return {"run": name, "recipe": recipe, "ok": True, "rc": None,
                "note": "dry run: recipe + overrides validated (one tiny run trains, gpt2_small)"}
    except Exception as e:
        return {"run": name, "recipe": recipe, "ok": False, "rc": None, "error": f"{type(e).__name__}: {e}"}


def _hf_beside(report, budget, dev, recipe, sets, kiln, need_s, steps) -> None:
    if not budget.allows(need_s):
        report.note("train", "HF loop skipped: time budget")
        return
    try:
        hf = hf_loop(recipe, {k: v for k, v in sets.items() if k.startswith(("model.", "data.", "train.micro"))},
                     dev, steps)
    except Exception as e:
        hf = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    hf["run"] = "hf_llama"
    if hf.get("tokens_per_s") and kiln.get("tokens_per_s"):
        hf["kiln_over_hf"] = kiln["tokens_per_s"] / hf["tokens_per_s"]
    hf["ok"] = None if "skipped" in hf else "error" not in hf
    report.add("train", hf)
    print(f"  HF LlamaForCausalLM   {hf}", flush=True)
    free_cuda(dev)


def free_cuda(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
