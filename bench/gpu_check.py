"""The one-call GPU check: install the wheelhouse, then prove and measure kiln's CUDA paths.

    python3 bench/gpu_check.py [--budget-s 450] [--parts kernels,speed,train,sp] [--out DIR]
    python3 bench/gpu_check.py --dry-run        # CPU, triton's interpreter, tiny shapes, < 1 min

In order, each part (and each case inside it) skipped when the time budget is near:
  1. kernels: every Triton kernel vs its fp64 torch reference, forward and every gradient, fp32
     and bf16, outputs poisoned with NaN first (bench/gpu/kernels.py);
  2. speed: the fused kernels vs torch eager, torch.compile, liger-kernel, SDPA and FlexAttention
     (bench/gpu/speed.py);
  3. train: gpt2_small and the MoE recipe on one GPU through the real `kiln train`, and HF's
     LlamaForCausalLM loop of gpt2_small's shape (bench/gpu/train.py);
  4. sp: TokenRing's local block compute at 16k-64k tokens vs SDPA (bench/gpu/sp.py).
The full results go to $OUT/gpu_check.json (saved after every case) with the log and the runs'
metrics beside it; a short table and the issue's goals are printed last. docs/gpu.md says how
to run it with the device tool.
"""
import argparse
import datetime
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("kernels", "speed", "train", "sp")
# seconds a part (or one of its cases) needs to start: GPU, dry run
# "share": what the later parts keep for themselves while an earlier one runs (gpu: 410 s of 450)
NEED = {"gpu": {"kernels": 20, "case": 8, "speed": 30, "compile": 45, "train": 90, "kiln": 80, "hf": 40,
                "reserve": 15, "sp": 10, "sp_first": 2,
                "share": {"kernels": 90, "speed": 110, "train": 170, "sp": 40}},
        "dry": {"kernels": 2, "case": 0.5, "speed": 2, "compile": 0, "train": 10, "kiln": 10, "hf": 3,
                "reserve": 2, "sp": 1, "sp_first": 0.2,
                "share": {"kernels": 5, "speed": 5, "train": 20, "sp": 2}}}


class Tee:
    """Everything printed also goes to the log under $OUT."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a")

    def write(self, s):
        self.stream.write(s)
        self.file.write(s)
        return len(s)

    def flush(self):
        self.stream.flush()
        self.file.flush()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: triton's interpreter, tiny shapes, tiny runs")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for everything (default 450; dry 90)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"),
                   help="results folder (default $OUT, else runs/gpu_check)")
    p.add_argument("--wheelhouse", default=str(ROOT / "wheelhouse"))
    p.add_argument("--max-docs", type=int, default=1500, help="documents of the embedded corpus to train on")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"unknown part {bad[0]!r}: choose from {', '.join(PARTS)}")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be positive")
    args.parts = parts
    args.budget_s = args.budget_s or (90.0 if args.dry_run else 450.0)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.dry_run:  # before anything imports triton: it decides compile vs interpret at import
        os.environ["TRITON_INTERPRET"] = "1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, out / "gpu_check.log")
    from gpu.common import Budget, Report, gemm_peak_flops
    from gpu import install
    budget = Budget(args.budget_s)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: error: no CUDA device visible (torch {torch.__version__}); --dry-run runs the CPU path",
              file=sys.stderr)
        return 2
    print(f"== install ({args.wheelhouse})", flush=True)
    inst = install.install(Path(args.wheelhouse), Path("/tmp/kiln-gpu-site"), args.dry_run)
    print(f"  {inst}", flush=True)
    dev = torch.device("cuda" if not args.dry_run else "cpu")
    mode = "dry" if args.dry_run else "gpu"
    need = NEED[mode]
    report = Report(out / "gpu_check.json", _meta(args, dev))
    report.data["install"] = inst
    peak = gemm_peak_flops(dev)
    report.data["meta"]["gemm_peak_tflops"] = peak / 1e12
    print(f"== {report.data['meta']['device']}: measured GEMM peak {peak / 1e12:.3g} TFLOP/s", flush=True)
    work = out / "work" if args.dry_run else Path("/tmp/kiln-gpu-work")
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    prep = None
    if "train" in args.parts and not args.dry_run and inst["ok"]:  # tokenise on the CPUs meanwhile
        from gpu.train import prepare_command
        prep = subprocess.Popen(prepare_command(work, args.max_docs), cwd=ROOT, env=env,
                                stdout=open(work / "prepare.log", "w"), stderr=subprocess.STDOUT)
    for i, part in enumerate(args.parts):
        # a part may use what is left less the shares of the parts after it, so that an early part
        # that runs long (compiles) cannot starve the training figures; a part that ends early
        # leaves its time to the ones after it
        later = sum(need["share"][p] for p in args.parts[i + 1:])
        mine = Budget(max(0.0, budget.left() - later))
        if not mine.allows(need[part]):
            report.part(part, "skipped", f"time budget: {budget.left():.0f} s left, {need[part]} s needed")
            print(f"== {part}: skipped (time budget)", flush=True)
            continue
        if part == "train" and not inst["ok"]:
            report.part(part, "skipped", f"the wheelhouse install failed: {inst.get('imports')}")
            continue
        print(f"== {part} ({mine.left():.0f} s of the {budget.left():.0f} s left)", flush=True)
        try:
            _run_part(part, report, mine, dev, args, need, work, env, prep, peak)
        except Exception:  # a broken part is a finding; the others still run
            report.finish(part, "failed", traceback.format_exc()[-3000:])
            print(traceback.format_exc(), flush=True)
        report.data[part]["seconds"] = round(mine.elapsed(), 1)
        report.save()
    report.data["meta"]["elapsed_s"] = budget.elapsed()
    _keep_metrics(work, out)
    report.save()
    from gpu.report import table
    print("\n" + table(report.data), flush=True)
    failed = [p for p in PARTS if p in report.data and (report.data[p]["status"] == "failed" or
              any(c.get("ok") is False for c in report.data[p]["cases"]))]
    return 1 if failed else 0


def _run_part(part, report, budget, dev, args, need, work, env, prep, peak):
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if part == "kernels":
        from gpu import kernels
        kernels.run(report, budget, dev, args.dry_run, interp, need["case"])
    elif part == "speed":
        from gpu import speed
        speed.run(report, budget, dev, args.dry_run, need["compile"])
    elif part == "train":
        from gpu import train
        train.run(report, budget, dev, args.dry_run, work, env, prep, peak, need, args.max_docs)
    else:
        from gpu import sp
        sp.run(report, budget, dev, args.dry_run, need["sp_first"])


def _meta(args, dev) -> dict:
    import torch
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": name,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "budget_s": args.budget_s,
            # the device machine gets the working tree without .git: the caller names the commit
            "commit": commit or os.environ.get("KILN_COMMIT") or "unknown (no git; set KILN_COMMIT)",
            "dry_run": args.dry_run, "parts": args.parts}
    if dev.type == "cuda":
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        meta["memory_gib"] = torch.cuda.get_device_properties(dev).total_memory / 2 ** 30
    return meta


def _keep_metrics(work: Path, out: Path) -> None:
    """The runs' metrics.jsonl and logs beside the JSON (the device tool fetches at most 8 files)."""
    for name in ("gpt2_small", "moe_1gpu"):
        m = work / "runs" / name / "metrics.jsonl"
        if m.exists() and work.parent != out:
            (out / f"{name}_metrics.jsonl").write_text(m.read_text())
        log = work / f"{name}.log"
        if log.exists() and work.parent != out:
            (out / f"{name}.log").write_text(log.read_text()[-200000:])


if __name__ == "__main__":
    sys.exit(main())
