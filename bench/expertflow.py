"""ExpertFlow against plain LRU offloading and no offloading, on a tiny MoE trained by kiln.

The model is recipes/moe_tiny.yaml (4 MoE layers x 8 experts, top-2) trained on one rank
(reused when --ckpt names a checkpoint or the bench's run exists). Its routing predictor is
trained by `kiln expertflow train-predictor`. Requests are pieces of held-out documents as
prompts; each policy decodes the same requests greedily (outputs are checked to be identical):
  none       every expert resident (the reference)
  lru        experts offloaded, loaded on demand, LRU eviction
  ef-nosched ExpertFlow's predictor prefetching, requests in arrival order
  expertflow predictor + token scheduler (requests grouped by predicted route)
at fast-tier caches of 25% and 50% of each layer's experts and batch sizes 1 and 32. Reported:
hit rate, Belady's offline optimum on the same trace, experts and bytes moved per token,
activated experts per batch (per layer and forward), fast-tier memory, and prefill / decode
throughput measured on this CPU and modelled for a PCIe 4.0 x16 link (25 GB/s, no overlap: the
measured compute time of `none` plus the bytes moved over the link).

    python bench/expertflow.py [--ckpt runs/x] [--requests 64] [--max-new 8] [--batches 1,32] [--json out.json]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PCIE4_BPS = 25e9


def kiln(*args) -> None:
    subprocess.run([sys.executable, "-m", "kiln.trainer.cli", *map(str, args)], cwd=ROOT, check=True)


def trained_checkpoint(args) -> Path:
    if args.ckpt:
        return Path(args.ckpt)
    run = Path(args.runs) / "bench_expertflow"
    if not (run / "checkpoints" / "latest").is_file():
        kiln("train", ROOT / "recipes" / "moe_tiny.yaml", "--set", "train.nproc=1", "--set", "parallel.ep=1",
             "--set", f"train.steps={args.train_steps}", "--set", "train.name=bench_expertflow",
             "--set", f"train.run_root={args.runs}", "--set", "logging.wandb.mode=disabled",
             "--set", "parallel.profile_every=0", "--set", "train.eval_every=0")
    return run


def requests(ckpt, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` held-out tokens: consecutive pieces of the held-out documents, each
    piece inside one document."""
    from kiln.data.indexed import read_documents

    tokens, starts, ends = read_documents(ckpt.data.valid_prefix)
    out = [tokens[a:a + length].astype(int).tolist()
           for s, e in zip(starts, ends) for a in range(s, e - length, length)]
    if len(out) < n:
        raise SystemExit(f"the held-out split has only {len(out)} pieces of {length} tokens: lower --requests")
    step = len(out) // n  # spread over the split, not the first documents only
    return out[::step][:n]


def run_policy(ckpt, policy: str, prompts, batch: int, slots: int, args, store: Path):
    """Decode every request under `policy`; (outputs, figures)."""
    from kiln.infer.expertflow.belady import belady
    from kiln.infer.expertflow.predictor import load_predictor
    from kiln.infer.expertflow.runtime import ExpertFlow, run_batches
    from kiln.infer.expertflow.offload import fast_tier_bytes
    from kiln.infer.generate import generate

    model = ckpt.model()
    flow = None
    if policy != "none":
        pred = load_predictor(ckpt.tag_dir / "expertflow") if policy.startswith("ef") or policy == "expertflow" else None
        flow = ExpertFlow.build(model, store, slots, pred)
    phase = {"prefill": [0.0, 0, 0, 0, 0], "decode": [0.0, 0, 0, 0, 0]}  # seconds, tokens, bytes, hits, misses
    mark = {}

    def before(ids, positions, valid):
        now = time.perf_counter()
        close(now)
        if flow is not None:
            flow.before(ids, positions, valid)
        st = flow.cache.stats if flow else None
        mark.update(t=now, phase="prefill" if ids.shape[1] > 1 else "decode", tokens=int(valid.sum()),
                    bytes=st.bytes_moved if st else 0, hits=st.hits if st else 0, misses=st.misses if st else 0)

    def close(now):
        if mark:
            p = phase[mark["phase"]]
            p[0] += now - mark["t"]
            p[1] += mark["tokens"]
            if flow is not None:
                st = flow.cache.stats
                p[2] += st.bytes_moved - mark["bytes"]
                p[3] += st.hits - mark["hits"]
                p[4] += st.misses - mark["misses"]
            mark.clear()

    def decode(batch_prompts):
        out = generate(model, batch_prompts, args.max_new, on_step=before)
        close(time.perf_counter())
        return out

    outs = run_batches(prompts, batch, decode, flow, scheduled=policy == "expertflow")
    fig = {"policy": policy, "batch": batch, "slots": slots}
    for name, (sec, tok, moved, hits, misses) in phase.items():
        fig[f"{name}_tok_s"] = tok / sec if sec else float("nan")
        fig[f"{name}_s"], fig[f"{name}_tokens"], fig[f"{name}_bytes"] = sec, tok, moved
        if hits + misses:
            fig[f"{name}_hit_rate"] = hits / (hits + misses)
    if flow is None:
        fig["fast_tier_bytes"] = fast_tier_bytes(model, None)
        return outs, fig
    m = flow.metrics()
    fig.update({k: m[k] for k in ("hit_rate", "loads_per_token", "misses_per_token", "bytes_per_token",
                                   "activated_per_batch", "fast_tier_bytes", "prefetched", "prefetch_unused",
                                   "misses", "tokens")})
    hits, accesses = belady(flow.cache.trace, slots)
    fig["belady_hit_rate"] = hits / accesses
    fig["belady_loads_per_token"] = (accesses - hits) / m["tokens"]
    fig["expert_tier_bytes"] = flow.cache.fast_bytes
    fig["expert_bytes_all"] = flow.cache.store.bytes_per_expert * flow.cache.store.experts * flow.cache.store.layers
    return outs, fig


def model_pcie(rows: list[dict]) -> None:
    """The PCIe 4.0 x16 ceiling on throughput: tokens / (bytes moved / 25 GB/s), per phase. On a
    GPU the copies of what was prefetched overlap compute; the on-demand ones stall it. This
    CPU's compute is far slower than a GPU's, so the link's share is shown alone, not summed."""
    for r in rows:
        for ph in ("prefill", "decode"):
            t = r[f"{ph}_bytes"] / PCIE4_BPS
            r[f"{ph}_tok_s_pcie4"] = r[f"{ph}_tokens"] / t if t else float("inf")


def table(rows: list[dict], experts: int) -> str:
    head = (f"{'policy':<11}{'batch':>6}{'cache':>7}{'hit':>7}{'dec hit':>8}{'belady':>8}{'load/tok':>9}{'min':>7}{'stall':>7}"
            f"{'KiB/tok':>9}{'act/bat':>8}{'fastMiB':>8}{'pre t/s':>9}{'dec t/s':>9}{'pre link':>10}{'dec link':>10}")
    lines = [head]
    for r in rows:
        cache = f"{100 * r['slots'] // experts}%" if r["policy"] != "none" else "-"
        def f(k, fmt):
            width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()))
            return format(r[k], fmt) if k in r else format("-", f">{width}")
        lines.append(f"{r['policy']:<11}{r['batch']:>6}{cache:>7}{f('hit_rate', '>7.3f')}{f('decode_hit_rate', '>8.3f')}{f('belady_hit_rate', '>8.3f')}"
                     f"{f('loads_per_token', '>9.3f')}{f('belady_loads_per_token', '>7.3f')}"
                     f"{f('misses_per_token', '>7.3f')}{(format(r['bytes_per_token'] / 1024, '>9.1f') if 'bytes_per_token' in r else format('-', '>9'))}"
                     f"{f('activated_per_batch', '>8.2f')}{r['fast_tier_bytes'] / 2**20:>8.2f}"
                     f"{r['prefill_tok_s']:>9.0f}{r['decode_tok_s']:>9.1f}"
                     f"{r['prefill_tok_s_pcie4']:>10.3g}{r['decode_tok_s_pcie4']:>10.3g}")
    return "\n".join(lines)


def goals(rows: list[dict], experts: int) -> list[str]:
    """The issue's goals at a 25% cache, per batch size, each with the figure it is judged on."""
    out = []
    q = max(1, experts // 4)
    for b in sorted({r["batch"] for r in rows}):
        g = {(r["policy"], r["slots"]): r for r in rows if r["batch"] == b}
        none, ef, lru, nos = g[("none", 0)], g[("expertflow", q)], g[("lru", q)], g[("ef-nosched", q)]
        out.append(
            f"batch {b}, 25% cache:\n"
            f"  hit rate {ef['hit_rate']:.3f} (goal >= 0.90), {ef['decode_hit_rate']:.3f} in decode steps, "
            f"{ef['prefill_hit_rate']:.3f} in prefill; LRU {lru['hit_rate']:.3f}, on-demand optimum (Belady) "
            f"{lru['belady_hit_rate']:.3f}\n"
            f"  fast tier {1 - ef['fast_tier_bytes'] / none['fast_tier_bytes']:.1%} below no offload (goal >= 70%); "
            f"expert weights alone {1 - ef['expert_tier_bytes'] / ef['expert_bytes_all']:.1%}\n"
            f"  bytes moved: LRU / ExpertFlow = {lru['bytes_per_token'] / ef['bytes_per_token']:.2f}x (goal >= 2x); "
            f"the fewest any policy can move on LRU's trace is {lru['belady_loads_per_token'] / lru['loads_per_token']:.2f}x "
            f"of LRU's; stalling (on-demand) loads: LRU / ExpertFlow = "
            f"{lru['misses_per_token'] / max(ef['misses_per_token'], 1e-12):.2f}x\n"
            f"  activated experts per batch: {ef['activated_per_batch']:.2f} scheduled vs {nos['activated_per_batch']:.2f} "
            f"in arrival order, {1 - ef['activated_per_batch'] / nos['activated_per_batch']:.1%} fewer (goal >= 10%)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="an MoE run or checkpoint to use instead of training one")
    ap.add_argument("--runs", default=str(ROOT / "runs"), help="where the bench trains its model")
    ap.add_argument("--train-steps", type=int, default=120)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--predictor-steps", type=int, default=600)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()

    from kiln.trainer.commands.common import open_checkpoint

    path = trained_checkpoint(args)
    ckpt = open_checkpoint(path)
    if not (ckpt.tag_dir / "expertflow" / "predictor.json").is_file():
        kiln("expertflow", "train-predictor", path, "--steps", args.predictor_steps)
    manifest = json.loads((ckpt.tag_dir / "expertflow" / "predictor.json").read_text())
    experts = ckpt.recipe.model.moe.num_experts
    prompts = requests(ckpt, args.requests, args.prompt_len)
    from kiln.infer.generate import generate
    generate(ckpt.model(), prompts[:4], 4)  # warm up (first calls allocate and build kernels)
    rows, ref = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "experts.safetensors"
        for b in map(int, args.batches.split(",")):
            outs, fig = run_policy(ckpt, "none", prompts, b, 0, args, store)
            ref[b] = outs
            rows.append(fig)
            for slots in (max(1, experts // 4), experts // 2):
                for policy in ("lru", "ef-nosched", "expertflow"):
                    outs, fig = run_policy(ckpt, policy, prompts, b, slots, args, store)
                    fig["same_tokens"] = outs == ref[b]
                    rows.append(fig)
                    print(f"  {policy} batch {b} slots {slots}: hit {fig['hit_rate']:.3f} "
                          f"(belady {fig['belady_hit_rate']:.3f}), same tokens {fig['same_tokens']}", flush=True)
    model_pcie(rows)
    s = manifest["scores"]["batch1"]
    print(f"\npredictor (held-out, top-{ckpt.recipe.model.moe.top_k} per token): accuracy {s['token/accuracy']:.3f} "
          f"vs frequency {s['token/baseline_accuracy']:.3f}; per layer " +
          " ".join(f"{s[f'token/accuracy_l{l}']:.2f}" for l in range(manifest["config"]["layers"])))
    print(f"{len(prompts)} requests x {args.prompt_len} prompt + {args.max_new} new tokens, "
          f"{experts} experts/layer (top-{ckpt.recipe.model.moe.top_k})\n")
    print(table(rows, experts))
    print("\n" + "\n".join(goals(rows, experts)))
    assert all(r.get("same_tokens", True) for r in rows), "an offloaded policy changed the generated tokens"
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "predictor": manifest["scores"]}, indent=1))


if __name__ == "__main__":
    main()
