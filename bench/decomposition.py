"""Dataset decomposition (Grow-P2) vs concat-and-chunk, with and without document masks, same
model and tokens.

    .venv/bin/python bench/decomposition.py                    # ~15 min on 2 busy CPU cores (3 runs)
    .venv/bin/python bench/decomposition.py --steps 8 --eval-tokens 16384   # a quick look
    .venv/bin/python bench/decomposition.py --loss-only --seed 1 --json s1.json   # held-out loss only
    .venv/bin/python bench/decomposition.py --summarize s0.json s1.json s2.json   # mean +- std over seeds

Both runs train the same seeded model on the embedded corpus (stdlib, BPE 4096) with the same
optimizer, schedule and tokens per step:
  - baseline "concat": concat-and-chunk windows of 2^max tokens with document masks (kiln's
    ChunkLoader; on CPU the mask goes to torch SDPA as a dense boolean mask);
  - baseline "nomask": the same windows with plain causal attention across documents (the
    paper's baseline; positions 0..2^max-1 per window);
  - decomposition: buckets 2^min..2^max, Grow-P2 over the run (kiln's DecomposeLoader), one
    document per row, plain causal attention.
Steps of the two runs alternate, so load from other jobs on the machine hits both alike.
`--seed S` seeds the model init (torch.manual_seed(S)) and both data orders (loader seed S + 1);
the default S = 0 is the original single-seed run. The no-mask baseline trains every step (so its
held-out loss is at equal tokens too) unless `--nomask-steps N` cuts it to N timed steps;
`--loss-only` skips it; `--method` runs one side alone.

Printed: attention FLOPs computed exactly from the length histograms (whole training split, and
the steps actually run), measured wall-clock per token, and held-out loss at equal tokens on
the same held-out windows (with document masks, for every run) at a short and at the long
length; the headline line states decomposition's speed-up per token against both baselines.
`--plot PATH` also writes an SVG of the bucket schedule (docs/decomposition_schedule.svg).
"""
import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

from kiln.data import DataConfig, prepare
from kiln.data.decompose_loader import build_decompose_loader
from kiln.data.decompose import Decomposed, bucket_dir
from kiln.data.indexed import read_documents
from kiln.data.loader import ChunkLoader
from kiln.infer.evaluate import heldout_loss
from kiln.trainer.optim import lr_lambda
from kiln.model import ModelConfig, Transformer, attention_flops, matmul_params
from kiln.trainer.objectives import CausalLM


def pairs(lengths) -> float:
    """(query, key) pairs a causal kernel computes over sequences of these lengths."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float((lengths * (lengths + 1) / 2).sum())


def window_pairs(starts, ends, window: int, n_windows: int) -> tuple[float, float]:
    """(causal pairs of whole windows, pairs within documents only) for the first n windows of
    the concatenated stream: what a dense causal kernel computes vs what document masks need."""
    full = n_windows * pairs([window])
    need = 0.0
    for w in range(n_windows):
        a, b = w * window, (w + 1) * window
        lo, hi = np.searchsorted(ends, a, side="right"), np.searchsorted(starts, b, side="left")
        seg = np.minimum(ends[lo:hi], b) - np.maximum(starts[lo:hi], a)
        need += pairs(seg[seg > 0])
    return full, need


def histogram_table(p, dec, hi: int) -> dict:
    """Attention pairs per token over the whole training split, from the length histograms."""
    _, starts, ends = read_documents(p.train_prefix)
    L = 1 << hi
    n = int(ends[-1]) // L
    full, need = window_pairs(starts, ends, L, n)
    buckets = dec.summary["splits"]["train"]["buckets"]
    dec_tokens = sum(b["tokens"] for b in buckets)
    dec_pairs = sum(b["chunks"] * pairs([b["length"]]) for b in buckets)
    return {"concat_pairs_per_token": full / (n * L), "concat_doc_pairs_per_token": need / (n * L),
            "decompose_pairs_per_token": dec_pairs / dec_tokens,
            "token_share": {b["length"]: b["tokens"] / dec_tokens for b in buckets}}


def train_step(objective, opt, sched, batch) -> float:
    loss = objective(**batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def evaluate(model, prefix: str, seq_len: int, tokens: int) -> float:
    """Mean held-out loss over the first `tokens` tokens, as windows of seq_len with doc masks."""
    rows = max(1, min(8, tokens // seq_len, 16384 // seq_len))  # dense 8k masks: keep memory modest
    loader = ChunkLoader(prefix, seq_len, rows, 0, 1, seed=0)
    return heldout_loss(model, loader.eval_batches(max(1, tokens // (rows * seq_len))))["loss"]


def eval_breakdown(model, prefix: str, seq_len: int, tokens: int, lo: int) -> dict:
    """Token-weighted held-out loss on the same windows as `evaluate`, split by target token:
    `dropped` = tokens decomposition never trains on (each document's last len mod 2^lo tokens,
    i.e. whole documents shorter than 2^lo and every tail below 2^lo), `kept` = all others."""
    rows = max(1, min(8, tokens // seq_len, 16384 // seq_len))
    loader = ChunkLoader(prefix, seq_len, rows, 0, 1, seed=0)
    _, starts, ends = read_documents(prefix)
    tail_from = ends - (ends - starts) % (1 << lo)  # first dropped token of every document
    sums, counts = {"kept": 0.0, "dropped": 0.0}, {"kept": 0, "dropped": 0}
    with torch.no_grad():
        for j, b in enumerate(loader.eval_batches(max(1, tokens // (rows * seq_len)))):
            first = (j * rows + np.arange(rows)) * seq_len       # unshuffled: sample i starts at i * L
            target = first[:, None] + np.arange(1, seq_len + 1)  # global index of each label's token
            doc = np.searchsorted(ends, target, side="right")
            dropped = torch.from_numpy(target >= tail_from[np.minimum(doc, len(ends) - 1)])
            hidden = model.eval()(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
            for name, sel in (("kept", ~dropped), ("dropped", dropped)):
                labels = torch.where(sel, b["labels"], torch.full_like(b["labels"], -100))
                n = int((labels != -100).sum())
                if n:
                    sums[name] += float(model.head(hidden, labels=labels)) * n
                    counts[name] += n
    total = sum(counts.values())
    return {"all": sum(sums.values()) / total, "dropped_share": counts["dropped"] / total,
            **{k: sums[k] / counts[k] if counts[k] else float("nan") for k in sums}}


def schedule_svg(panels, lo: int, hi: int, width: int = 760, height: int = 120) -> str:
    """A stacked scatter plot (SVG) of bucket per step, one panel per (title, buckets) pair,
    with the moving average of log2(length) over 1/40 of the steps as a line."""
    pad, out = 40, []
    total_h = len(panels) * (height + 30) + 10
    out.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
               'font-family="sans-serif" font-size="11">')
    out.append(f'<rect width="{width}" height="{total_h}" fill="white"/>')
    for i, (title, buckets) in enumerate(panels):
        y0 = 10 + i * (height + 30)
        out.append(f'<text x="{pad}" y="{y0 + 10}" font-weight="bold">{title}</text>')
        top, bottom = y0 + 18, y0 + height
        n = max(len(buckets), 1)
        for k in range(lo, hi + 1):
            y = bottom - (k - lo) / max(hi - lo, 1) * (bottom - top - 6) - 3
            out.append(f'<text x="4" y="{y + 4:.1f}">{1 << k}</text>')
            out.append(f'<line x1="{pad}" x2="{width - 5}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        for s, k in enumerate(buckets):
            x = pad + s / n * (width - pad - 5)
            y = bottom - (k - lo) / max(hi - lo, 1) * (bottom - top - 6) - 3
            out.append(f'<rect x="{x:.2f}" y="{y - 3:.1f}" width="{max((width - pad) / n, 0.8):.2f}" '
                       'height="6" fill="#c0392b"/>')
        win = max(1, n // 40)
        avg = np.convolve(np.asarray(buckets, np.float64), np.ones(win) / win, mode="valid")
        pts = " ".join(f"{pad + (s + win / 2) / n * (width - pad - 5):.1f},"
                       f"{bottom - (a - lo) / max(hi - lo, 1) * (bottom - top - 6) - 3:.1f}"
                       for s, a in enumerate(avg))
        out.append(f'<polyline points="{pts}" fill="none" stroke="#1f3a93" stroke-width="1.5"/>')
        out.append(f'<text x="{width - 5}" y="{bottom + 14}" text-anchor="end">{n} steps; line: '
                   f'mean log2(length) over {win} steps</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--buckets", type=int, nargs=2, default=[8, 13])
    ap.add_argument("--cycles", type=int, default=2, help="curriculum cycles over the run")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--eval-short", type=int, default=256,
                    help="length of the short held-out windows (fixed, so runs with other buckets compare)")
    ap.add_argument("--nomask-steps", type=int, default=-1,
                    help="steps of the concat-without-masks baseline (-1 = all: a full run with held-out "
                         "loss; fewer: timing only)")
    ap.add_argument("--curriculum", default="grow_p2", choices=["grow_p2", "grow_linear", "natural"])
    ap.add_argument("--decompose-only", action="store_true",
                    help="train the decomposition run alone (same as --method decompose)")
    ap.add_argument("--method", default="both", choices=["both", "concat", "decompose"],
                    help="which runs to train (one side alone: loss comparisons across invocations)")
    ap.add_argument("--seed", type=int, default=0,
                    help="model init seed; data order seed is seed + 1 (default 0: the original run)")
    ap.add_argument("--loss-only", action="store_true",
                    help="skip the no-mask timing steps: held-out loss only (timings still printed)")
    ap.add_argument("--summarize", nargs="+", default=[],
                    help="print mean +- std over seeds of these --json files and exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=".kiln-cache")
    ap.add_argument("--plot", default="", help="write the bucket-schedule SVG here")
    ap.add_argument("--json", default="", help="write the figures as JSON here")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if args.decompose_only:
        args.method = "decompose"
    if args.loss_only:
        args.nomask_steps = 0
    torch.set_num_threads(args.threads)
    lo, hi = args.buckets
    T, L = args.tokens_per_step, 1 << hi
    if args.nomask_steps < 0 or args.nomask_steps > args.steps:
        args.nomask_steps = args.steps

    cfg = DataConfig(source="stdlib", vocab_size=4096, cache_dir=args.cache_dir, packing="decompose",
                     buckets=[lo, hi], curriculum=args.curriculum, num_cycles=args.cycles, num_workers=2)
    p = prepare(cfg, progress=False)
    dec = Decomposed.load(bucket_dir(p.dir, cfg.buckets, cfg.decompose_seed, cfg.long_doc_rule))
    base_loader = ChunkLoader(p.train_prefix, L, T // L, 0, 1, seed=args.seed + 1)
    decompose_loader = build_decompose_loader(cfg, dec, "train", T, 0, 1, seed=args.seed + 1, horizon=args.steps)

    mcfg = ModelConfig(vocab_size=-(-p.vocab_size // 64) * 64, dim=args.dim, n_layers=args.layers,
                       n_heads=args.heads)
    torch.manual_seed(args.seed)
    init = Transformer(mcfg)
    models = {}
    if args.method in ("both", "concat"):
        models["concat"] = copy.deepcopy(init)
        if args.nomask_steps > 0:
            models["nomask"] = copy.deepcopy(init)  # plain causal concat: cross-document attention
    if args.method in ("both", "decompose"):
        models["decompose"] = init
    runs = {name: new_run(model, args) for name, model in models.items()}
    per_bucket: dict[int, list[float]] = {}
    for step in range(args.steps):
        # the runs take turns first, so load from other jobs on the machine hits them alike
        live = [n for n in ("concat", "decompose", "nomask") if n in runs and (n != "nomask" or step < args.nomask_steps)]
        order = live[step % len(live):] + live[:step % len(live)]
        line = f"step {step + 1:>4}/{args.steps}"
        for name in order:
            r = runs[name]
            if name == "nomask":
                batch = {k: v for k, v in base_loader.batch(step).items() if k != "doc_ids"}
                batch["position_ids"] = torch.arange(L).expand(T // L, L)
                r["pairs"] += len(batch["input_ids"]) * pairs([L])
                r["doc_pairs"] = r["pairs"]
            elif name == "concat":
                batch = base_loader.batch(step)
                for row in batch["doc_ids"].numpy():
                    r["doc_pairs"] += pairs(np.bincount(row))
                r["pairs"] += len(batch["doc_ids"]) * pairs([L])
            else:
                plan = decompose_loader.plan(step)
                batch = decompose_loader.batch(step)
                r["pairs"] += plan.rows * pairs([plan.seq_len])
                r["doc_pairs"] = r["pairs"]
            t0 = time.perf_counter()
            r["losses"].append(train_step(r["obj"], r["opt"], r["sched"], batch))
            r["times"].append(time.perf_counter() - t0)
            if name == "decompose":
                per_bucket.setdefault(plan.bucket, []).append(r["times"][-1])
                name = f"decompose 2^{plan.bucket}"
            line += f" | {name} {r['times'][-1]:5.2f}s loss {r['losses'][-1]:.3f}"
        print(line, flush=True)

    tokens = args.steps * T
    res = {"args": vars(args), "histogram": histogram_table(p, dec, hi), "tokens": tokens}
    nm = runs.get("nomask")
    if nm is not None and nm["times"]:
        res["nomask_s_per_token"] = sum(nm["times"]) / (len(nm["times"]) * T)
        res["concat_first_steps_s_per_token"] = sum(runs["concat"]["times"][:len(nm["times"])]) / (len(nm["times"]) * T)
        res["decompose_first_steps_s_per_token"] = (sum(runs["decompose"]["times"][:len(nm["times"])]) /
                                                    (len(nm["times"]) * T) if "decompose" in runs else None)
        res["nomask_steps"] = len(nm["times"])
    if nm is not None and len(nm["times"]) < args.steps:
        runs.pop("nomask")  # timing only: not trained on the run's tokens, so no held-out loss
    for name, r in runs.items():
        res[name] = {"s_per_token": sum(r["times"]) / tokens, "median_step_s": statistics.median(r["times"]),
                     "attn_pairs": r["pairs"], "doc_pairs": r["doc_pairs"],
                     "attn_flops": attention_flops(mcfg, r["pairs"]),
                     "matmul_flops": 6 * matmul_params(mcfg) * tokens,
                     "final_train_loss": statistics.mean(r["losses"][-4:]),
                     "eval_short": evaluate(models[name], p.valid_prefix, args.eval_short, args.eval_tokens),
                     "eval_long": evaluate(models[name], p.valid_prefix, L, args.eval_tokens),
                     "breakdown_short": eval_breakdown(models[name], p.valid_prefix, args.eval_short, args.eval_tokens, lo),
                     "breakdown_long": eval_breakdown(models[name], p.valid_prefix, L, args.eval_tokens, lo)}
    if "decompose" in res:
        res["decompose"]["tokens_per_s_by_bucket"] = {1 << k: (T * len(v)) / sum(v) for k, v in sorted(per_bucket.items())}
    report(res, p, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        write_plot(args.plot, cfg, dec, decompose_loader, args)


def new_run(model, args) -> dict:
    """Optimizer, schedule and accumulators of one training run of `model`."""
    obj = CausalLM(model)
    opt = torch.optim.AdamW(obj.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, args.warmup, args.steps, "cosine", 0.1))
    return {"obj": obj, "opt": opt, "sched": sched, "times": [], "losses": [], "pairs": 0.0, "doc_pairs": 0.0}


def report(res: dict, p, args) -> None:
    """Print the figures (ratios only when the concat baseline ran)."""
    lo, hi = args.buckets
    L, hist, d, c = 1 << hi, res["histogram"], res.get("decompose"), res.get("concat")
    print(f"\ncorpus: stdlib, {p.train_tokens:,} train tokens; buckets 2^{lo}..2^{hi}; model dim {args.dim} x "
          f"{args.layers} layers x {args.heads} heads; {args.steps} steps x {args.tokens_per_step:,} tokens = "
          f"{res['tokens']:,} tokens per run; curriculum {args.curriculum}, {args.cycles} cycles")
    print("token share by bucket: " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in hist["token_share"].items()))
    print(f"attention pairs per token, whole split: concat@{L} {hist['concat_pairs_per_token']:.0f} "
          f"(within documents {hist['concat_doc_pairs_per_token']:.0f}), decompose "
          f"{hist['decompose_pairs_per_token']:.0f} -> ratio "
          f"{hist['concat_pairs_per_token'] / hist['decompose_pairs_per_token']:.2f}x")
    if c and d:
        print(f"attention FLOPs, steps run: concat {c['attn_flops']:.3e}, decompose {d['attn_flops']:.3e} -> "
              f"{c['attn_flops'] / d['attn_flops']:.2f}x; total (with matmuls {c['matmul_flops']:.3e}) "
              f"{(c['attn_flops'] + c['matmul_flops']) / (d['attn_flops'] + d['matmul_flops']):.2f}x")
    print(f"{'':>10} {'ms/1k tok':>10} {'median step s':>14} {'train loss':>11} "
          f"{'eval@' + str(args.eval_short):>10} {'eval@' + str(L):>10}")
    for name in ("concat", "nomask", "decompose"):
        if name in res:
            r = res[name]
            print(f"{name:>10} {1e6 * r['s_per_token']:>10.1f} {r['median_step_s']:>14.2f} "
                  f"{r['final_train_loss']:>11.3f} {r['eval_short']:>10.3f} {r['eval_long']:>10.3f}")
    if c and d:
        print(f"wall-clock per token: decomposition {c['s_per_token'] / d['s_per_token']:.2f}x faster "
              f"(goal >= 1.5x); held-out loss delta (decompose - concat): short "
              f"{d['eval_short'] - c['eval_short']:+.3f}, long {d['eval_long'] - c['eval_long']:+.3f} (goal <= 0)")
    if "nomask_s_per_token" in res and "nomask" not in res:
        print(f"concat without document masks (cross-document attention, timing only, first "
              f"{res['nomask_steps']} steps): {1e6 * res['nomask_s_per_token']:.1f} ms/1k tok vs concat with "
              f"masks {1e6 * res['concat_first_steps_s_per_token']:.1f} over the same steps")
    if c and d:
        print(headline(res, args))
    if d:
        print("decompose tokens/s by bucket: " + ", ".join(
            f"{k}: {v:,.0f}" for k, v in d["tokens_per_s_by_bucket"].items()))


def headline(res: dict, args) -> str:
    """The one-line result: decomposition's wall-clock speed-up per token against both baselines
    (concat with dense document masks, and plain causal concat: the paper's), and the held-out
    losses at equal tokens (no-mask loss only when that baseline trained every step)."""
    d, c, L = res["decompose"], res["concat"], 1 << args.buckets[1]
    if "nomask" in res:
        nm_ratio = res["nomask"]["s_per_token"] / d["s_per_token"]
        nm_loss = f", concat causal {res['nomask']['eval_short']:.3f}/{res['nomask']['eval_long']:.3f}"
    elif res.get("decompose_first_steps_s_per_token"):
        nm_ratio = res["nomask_s_per_token"] / res["decompose_first_steps_s_per_token"]
        nm_loss = f" (no-mask baseline timed on its first {res['nomask_steps']} steps only: no loss)"
    else:
        nm_ratio, nm_loss = float("nan"), ""
    return (f"HEADLINE: decomposition is {c['s_per_token'] / d['s_per_token']:.2f}x faster per token than "
            f"concat with document masks (dense mask, CPU SDPA) and {nm_ratio:.2f}x faster than plain causal "
            f"concat (the paper's baseline); held-out loss @{args.eval_short}/@{L}: decompose "
            f"{d['eval_short']:.3f}/{d['eval_long']:.3f}, concat+masks {c['eval_short']:.3f}/{c['eval_long']:.3f}"
            f"{nm_loss}")


def summarize(paths) -> None:
    """Held-out losses of several --json runs (one per seed): per run, then mean +- std per method."""
    rows: dict[str, list] = {}
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        a = res["args"]
        for name in ("concat", "decompose"):
            if name in res:
                key = name if name == "concat" else (f"decompose {a['curriculum']} c{a['cycles']} "
                                                     f"b{a['buckets'][0]}-{a['buckets'][1]}")
                key += f" {a['steps']}x{a['tokens_per_step']}"
                r = res[name]
                rows.setdefault(key, []).append((a["seed"], r["eval_short"], r["eval_long"]))
                print(f"{path}: {key} seed {a['seed']}: eval short {r['eval_short']:.4f} long {r['eval_long']:.4f}")
    def sd(x):
        return x.std(ddof=1) if len(x) > 1 else float("nan")

    for key, v in rows.items():
        sh, lg = np.array([x[1] for x in v]), np.array([x[2] for x in v])
        print(f"{key:>44}: n={len(v)} short {sh.mean():.4f} +- {sd(sh):.4f}  long {lg.mean():.4f} +- {sd(lg):.4f}")
    for key, v in rows.items():  # decompose - concat at the same seed and steps (same model init)
        base = {x[0]: x for x in rows.get("concat " + key.rsplit(" ", 1)[1], [])}
        if key.startswith("decompose") and base:
            ds = np.array([(x[1] - base[x[0]][1], x[2] - base[x[0]][2]) for x in v if x[0] in base])
            if len(ds):
                print(f"{key:>44}: delta vs concat over {len(ds)} seeds: short {ds[:, 0].mean():+.4f} +- "
                      f"{sd(ds[:, 0]):.4f}  long {ds[:, 1].mean():+.4f} +- {sd(ds[:, 1]):.4f}")


def write_plot(path: str, cfg: DataConfig, dec, run_loader, args, tokens: int = 16384) -> None:
    """The bucket schedule of a whole epoch (grow_p2 and natural) and of this run, as SVG."""
    def loader(**kw):
        return build_decompose_loader(DataConfig(**{**cfg.__dict__, **kw}), dec, "train", tokens, 0, 1, seed=1)

    full, nat = loader(num_cycles=8), loader(curriculum="natural", num_cycles=8)
    n = full.steps_per_epoch
    panels = [(f"grow_p2, 8 cycles: one epoch of the stdlib corpus at {tokens:,} tokens/step",
               [full.plan(s).bucket for s in range(n)]),
              ("natural (all weights 1): the same epoch", [nat.plan(s).bucket for s in range(n)]),
              (f"this benchmark's run: grow_p2, {args.cycles} cycles over {args.steps} steps "
               f"of {args.tokens_per_step:,} tokens", [run_loader.plan(s).bucket for s in range(args.steps)])]
    with open(path, "w") as f:
        f.write(schedule_svg(panels, *cfg.buckets))
    print(f"schedule plot: {path}")


if __name__ == "__main__":
    main()
