"""MEAP against next-token prediction (CLM), and ELECTRA against MLM, through the real
`kiln train` and `kiln eval`.

Same model, same data (the embedded corpus with data.synthetic_needles of key-value needle
documents mixed in, identical for both objectives), same tokens, same seeds; only
objective.name differs. Per seed and objective it reports
  * kv_retrieval accuracy over the grid context lengths x needle depths (greedy exact match of
    the 4-digit value, kiln.infer.tasks.kv_retrieval) and its token accuracy;
  * the final held-out loss (plain next-token loss on unmasked held-out text, both objectives).
Goals (../shared/METHODS.md section 6): retrieval clearly higher for MEAP, held-out loss within 2%.
With --plot DIR it writes one heat map per objective (mean accuracy over seeds), SVG and PNG.

    python bench/objectives.py [--steps 1000] [--seeds 3] [--needles 0.5] [--plot docs]  (~28 min on 2 CPU cores)

`--compare electra`: ELECTRA against MLM at equal compute on the same encoder (model.causal=false),
the same data and seeds: MLM trains --steps steps and ELECTRA as many as the same training FLOPs
buy (both objectives' flops_per_token: ELECTRA counts its generator too). Per seed it reports the
`kiln eval --task probe` held-out accuracy (which standard-library package a snippet is from, a
linear probe on frozen mean-pooled features), beside two references computed here: the same
encoder untrained, and a bag of tokens. Goal (METHODS.md section 7): ELECTRA higher.

    python bench/objectives.py --compare electra [--steps 400] [--seeds 3]  (~25 min per 2 seeds on a loaded
    2-core machine; --steps 150 keeps 3 seeds near 15 min on quiet cores)
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
OBJECTIVES = ("clm", "meap")
RECIPE = """
model: {{dim: {dim}, n_layers: {layers}, n_heads: 4, n_kv_heads: 2}}
data: {{source: stdlib, vocab_size: 2048, seq_len: {seq}, max_documents: {docs}, cache_dir: {cache},
       synthetic_needles: {needles}}}
train: {{steps: {steps}, micro_batch: 8, nproc: 2, log_every: 50, eval_every: 0, eval_batches: 8,
        run_root: {runs}, seed: {seed}, compile: off}}
objective: {{name: {objective}, meap: {{mask_ratio: {ratio}}}}}
logging: {{wandb: {{mode: disabled}}}}
checkpoint: {{every: 0, keep: 1}}
optim: {{lr: {lr}}}
schedule: {{warmup_steps: 20}}
"""


def kiln(*args) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-m", "kiln.trainer.cli", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"kiln {' '.join(map(str, args))} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res.stdout


def one(home: Path, objective: str, seed: int, args) -> dict:
    """Train one run and score it: {"accuracy", "token_accuracy", "grid", "loss"}."""
    name = f"{objective}-s{seed}"
    recipe = home / f"{name}.yaml"
    recipe.write_text(RECIPE.format(dim=args.dim, layers=args.layers, seq=args.seq_len, docs=args.docs,
                                    cache=args.cache or home / "cache", needles=args.needles, steps=args.steps,
                                    runs=home / "runs", seed=seed, objective=objective, ratio=args.mask_ratio,
                                    lr=args.lr))
    kiln("train", recipe, "--no-resume")
    run = home / "runs" / name
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    loss = [r["eval/loss"] for r in recs if "eval/loss" in r][-1]
    out = home / f"{name}.kv.json"
    kiln("eval", run, "--task", "kv_retrieval", "--lengths", args.lengths, "--depths", args.depths,
         "--samples", args.samples, "--metrics-out", out)
    kv = json.loads(out.read_text())
    return {"accuracy": kv["accuracy"], "token_accuracy": kv["token_accuracy"], "grid": kv["grid"],
            "lengths": kv["lengths"], "depths": kv["depths"], "loss": loss}


def heat_svg(title: str, grid, lengths, depths, cell=56) -> str:
    """A heat map of accuracy (rows: context lengths, columns: needle depths), white 0 to blue 1."""
    left, top = 70, 40
    w, h = left + cell * len(depths) + 10, top + cell * len(lengths) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="12"><text x="{left}" y="20">{title}</text>']
    for i, n in enumerate(lengths):
        out.append(f'<text x="{left - 8}" y="{top + cell * i + cell / 2 + 4}" text-anchor="end">{n}</text>')
        for j, _ in enumerate(depths):
            v = grid[i][j]
            c = int(255 * (1 - v))
            out.append(f'<rect x="{left + cell * j}" y="{top + cell * i}" width="{cell}" height="{cell}" '
                       f'fill="rgb({c},{c},255)" stroke="#888"/><text x="{left + cell * j + cell / 2}" '
                       f'y="{top + cell * i + cell / 2 + 4}" text-anchor="middle">{v:.2f}</text>')
    for j, d in enumerate(depths):
        out.append(f'<text x="{left + cell * j + cell / 2}" y="{top + cell * len(lengths) + 16}" '
                   f'text-anchor="middle">{d:g}</text>')
    out.append(f'<text x="{left}" y="{h - 6}">needle depth (0 = start) / rows: context length (tokens)</text></svg>')
    return "\n".join(out)


ENCODER = """
model: {{dim: {dim}, n_layers: {layers}, n_heads: 4, n_kv_heads: 2, causal: false, vocab_size: {vocab}}}
data: {{source: stdlib, vocab_size: {vocab}, seq_len: {seq}, max_documents: {docs}, cache_dir: {cache}}}
train: {{steps: {steps}, micro_batch: 8, nproc: 2, log_every: 50, eval_every: 0, eval_batches: 4,
        run_root: {runs}, seed: {seed}, compile: off}}
objective: {{name: {objective}}}
logging: {{wandb: {{mode: disabled}}}}
checkpoint: {{every: 0, keep: 1}}
optim: {{lr: {lr}}}
schedule: {{warmup_steps: 20}}
"""


def encoder_flops(objective: str, args) -> float:
    """Training FLOPs per token of `objective` on the bench's encoder (the objectives' own count)."""
    from kiln.model import ModelConfig, Transformer
    from kiln.trainer.objectives import build_objective
    from kiln.trainer.objectives.config import ObjectiveConfig

    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2, causal=False)
    obj = build_objective(objective, Transformer(cfg), ObjectiveConfig(name=objective), mask_id=1)
    return obj.flops_per_token(args.seq_len)


def probe_run(home: Path, objective: str, seed: int, steps: int, args) -> dict:
    """Train one encoder run and probe it: {"accuracy", "steps", "flops", "window": last train record}."""
    name = f"{objective}-s{seed}"
    recipe = home / f"{name}.yaml"
    recipe.write_text(ENCODER.format(dim=args.dim, layers=args.layers, seq=args.seq_len, docs=args.docs,
                                     cache=args.cache or home / "cache", steps=steps, runs=home / "runs",
                                     seed=seed, objective=objective, lr=args.lr, vocab=args.vocab))
    kiln("train", recipe, "--no-resume")
    run = home / "runs" / name
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in recs if "train/flops" in r][-1]
    out = home / f"{name}.probe.json"
    kiln("eval", run, "--task", "probe", "--per-class", args.per_class, "--snippet-len", args.snippet_len,
         "--metrics-out", out)
    pr = json.loads(out.read_text())
    return {"accuracy": pr["accuracy"], "chance": pr["chance"], "steps": steps, "flops": last["train/flops"],
            "window": {k: v for k, v in last.items() if k.startswith(("objective/", "train/loss"))},
            "run": str(run)}


def references(run: str, args) -> dict:
    """Probe accuracy of the bench's encoder untrained and of a bag of tokens, on the same data."""
    import torch

    from kiln.infer.tasks.probe import probe, stdlib_snippets
    from kiln.model import ModelConfig, Transformer
    from kiln.trainer.commands.common import open_checkpoint

    ckpt = open_checkpoint(run)
    data = stdlib_snippets(ckpt.data.tokenizer(), args.snippet_len, args.per_class, seed=ckpt.recipe.train.seed)
    torch.manual_seed(ckpt.recipe.train.seed)
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2, causal=False)
    bag = lambda ids: torch.nn.functional.one_hot(ids, args.vocab).float()  # noqa: E731
    return {"untrained": probe(Transformer(cfg), data)["accuracy"], "bag_of_tokens": probe(bag, data)["accuracy"]}


def electra_vs_mlm(args) -> None:
    """The --compare electra bench (see the module docstring)."""
    fpt = {o: encoder_flops(o, args) for o in ("mlm", "electra")}
    steps = {"mlm": args.steps, "electra": max(1, round(args.steps * fpt["mlm"] / fpt["electra"]))}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    res, refs = {"mlm": [], "electra": []}, []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for seed in seeds:
            for o in ("mlm", "electra"):
                r = probe_run(home, o, seed, steps[o], args)
                res[o].append(r)
                w = r["window"]
                extra = (f" | gen_mlm_acc {w['objective/gen_mlm_acc']:.3f} disc_acc {w['objective/disc_acc']:.3f} "
                         f"replaced {w['objective/replaced_frac']:.3f}" if o == "electra" else
                         f" | mlm_acc {w['objective/mlm_acc']:.3f}")
                print(f"seed {seed} {o:>7}: {r['steps']} steps, {r['flops'] / 1e12:.2f} TFLOP, probe {r['accuracy']:.3f}"
                      + extra, flush=True)
            refs.append(references(res["mlm"][-1]["run"], args))
            print(f"seed {seed} references: untrained {refs[-1]['untrained']:.3f}, bag of tokens "
                  f"{refs[-1]['bag_of_tokens']:.3f}", flush=True)
    print(f"\nencoder dim {args.dim} x {args.layers} layers, seq {args.seq_len}, vocab {args.vocab}; FLOPs/token: "
          f"mlm {fpt['mlm']:.3e}, electra {fpt['electra']:.3e} (x{fpt['electra'] / fpt['mlm']:.3f}); "
          f"steps mlm {steps['mlm']}, electra {steps['electra']}; {len(seeds)} seeds; probe chance "
          f"{res['mlm'][0]['chance']:.3f}")
    print("| model | steps | training TFLOP | probe accuracy (per seed) | mean |")
    print("| --- | --- | --- | --- | --- |")
    for o in ("mlm", "electra"):
        acc = [r["accuracy"] for r in res[o]]
        print(f"| {o} | {steps[o]} | {statistics.mean(r['flops'] for r in res[o]) / 1e12:.2f} | "
              f"{', '.join(f'{a:.3f}' for a in acc)} | {statistics.mean(acc):.3f} |")
    for k in ("untrained", "bag_of_tokens"):
        acc = [r[k] for r in refs]
        print(f"| {k.replace('_', ' ')} (reference) | 0 | 0 | {', '.join(f'{a:.3f}' for a in acc)} | "
              f"{statistics.mean(acc):.3f} |")
    gain = [e["accuracy"] - m["accuracy"] for e, m in zip(res["electra"], res["mlm"])]
    print(f"ELECTRA - MLM probe accuracy per seed: {', '.join(f'{g:+.3f}' for g in gain)} "
          f"(mean {statistics.mean(gain):+.3f}; goal: > 0)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "flops_per_token": fpt, "steps": steps,
                                               "results": res, "references": refs}, indent=1))


def heat_png(path: Path, title: str, grid, lengths, depths) -> None:
    """The heat map of heat_svg as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(depths) + 1.5, 0.8 * len(lengths) + 1.2), dpi=100)
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", color="white" if grid[i][j] > 0.6 else "black")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth (0 = start)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=1, help="run seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--docs", type=int, default=600, help="data.max_documents")
    p.add_argument("--needles", type=float, default=0.5, help="data.synthetic_needles")
    p.add_argument("--mask-ratio", type=float, default=0.15)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--lengths", default="64,96,128")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--cache", default="", help="data cache (default: a temporary one)")
    p.add_argument("--plot", default="", help="folder for the heat maps (objectives_<name>.svg)")
    p.add_argument("--json", default="", help="write every figure here")
    p.add_argument("--compare", default="meap", choices=["meap", "electra"],
                   help="meap: MEAP vs CLM (kv_retrieval); electra: ELECTRA vs MLM at equal FLOPs (probe)")
    p.add_argument("--vocab", type=int, default=2048, help="--compare electra: tokenizer and model vocabulary")
    p.add_argument("--per-class", type=int, default=48, help="--compare electra: probe training snippets per class")
    p.add_argument("--snippet-len", type=int, default=64, help="--compare electra: probe snippet tokens")
    args = p.parse_args()
    if args.compare == "electra":
        return electra_vs_mlm(args)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        res = {o: [] for o in OBJECTIVES}
        for seed in seeds:  # objectives interleaved per seed, so a cut-short bench stays paired
            for o in OBJECTIVES:
                r = one(home, o, seed, args)
                res[o].append(r)
                print(f"seed {seed} {o:>4}: kv_retrieval {r['accuracy']:.3f} (token {r['token_accuracy']:.3f}) | "
                      f"held-out loss {r['loss']:.4f}", flush=True)
    print(f"\n{args.steps} steps x 2,048 tokens, dim {args.dim} x {args.layers} layers, seq {args.seq_len}, "
          f"needles {args.needles}, mask ratio {args.mask_ratio}, {len(seeds)} seeds")
    print("| objective | kv_retrieval (per seed) | mean | token acc. mean | held-out loss (per seed) | mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for o in OBJECTIVES:
        acc, tok, loss = ([r[k] for r in res[o]] for k in ("accuracy", "token_accuracy", "loss"))
        print(f"| {o} | {', '.join(f'{a:.3f}' for a in acc)} | {statistics.mean(acc):.3f} | "
              f"{statistics.mean(tok):.3f} | {', '.join(f'{x:.4f}' for x in loss)} | {statistics.mean(loss):.4f} |")
    gain = [m["accuracy"] - c["accuracy"] for m, c in zip(res["meap"], res["clm"])]
    ratio = [m["loss"] / c["loss"] for m, c in zip(res["meap"], res["clm"])]
    print(f"MEAP - CLM retrieval per seed: {', '.join(f'{g:+.3f}' for g in gain)} (mean {statistics.mean(gain):+.3f}; "
          f"goal: clearly > 0)")
    print(f"MEAP / CLM held-out loss per seed: {', '.join(f'{x:.4f}' for x in ratio)} (mean "
          f"{statistics.mean(ratio):.4f}; goal: <= 1.02)")
    first = res["clm"][0]
    for o in OBJECTIVES:
        mean_grid = [[statistics.mean(r["grid"][i][j] for r in res[o]) for j in range(len(first["depths"]))]
                     for i in range(len(first["lengths"]))]
        print(f"\n{o} mean accuracy, rows = lengths {first['lengths']}, columns = depths {first['depths']}")
        for n, row in zip(first["lengths"], mean_grid):
            print(f"  {n:>5}: " + " ".join(f"{v:.2f}" for v in row))
        if args.plot:
            path = Path(args.plot) / f"objectives_{o}.svg"
            title = f"{o}: kv_retrieval accuracy (mean of {len(seeds)} seeds)"
            path.write_text(heat_svg(title, mean_grid, first["lengths"], first["depths"]))
            heat_png(path.with_suffix(".png"), title, mean_grid, first["lengths"], first["depths"])
            print(f"  heat maps -> {path}, {path.with_suffix('.png')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": res}, indent=1))


if __name__ == "__main__":
    main()
