"""`kiln expertflow train-predictor CKPT`: record an MoE checkpoint's routes on its training
corpus, fit ExpertFlow's routing-path predictor, score it on held-out routes against a
per-layer frequency baseline, and save it beside the checkpoint with a manifest."""
from kiln.trainer.config import ConfigError


def add_parser(sub) -> None:
    """Declare `kiln expertflow`'s subcommands."""
    g = sub.add_parser("expertflow", help="ExpertFlow tools for serving MoE checkpoints with offloaded experts",
                       description="ExpertFlow tools for serving MoE checkpoints with offloaded experts.")
    what = g.add_subparsers(dest="what", required=True, metavar="TOOL")
    t = what.add_parser("train-predictor", help="train the routing-path predictor of a checkpoint",
                        description="Record routes of the checkpoint on its training split and fit the predictor.")
    t.add_argument("ckpt", metavar="CKPT", help="run directory (newest checkpoint) or a checkpoint directory")
    t.add_argument("--sequences", type=int, default=512, help="training windows of data.seq_len to record (default 512)")
    t.add_argument("--heldout", type=int, default=64, help="held-out windows to score on (default 64)")
    t.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    t.add_argument("--dim", type=int, default=64, help="predictor width (default 64)")
    t.add_argument("--layers", type=int, default=2, help="predictor transformer blocks (default 2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--store", metavar="DIR", help="where to save it (default: CKPT/expertflow)")


def run(args) -> int:
    """Train, score and save the predictor; print its per-layer accuracy against the baseline."""
    import time

    from kiln.data.loader import ChunkLoader
    from kiln.infer.expertflow import predictor as P
    from kiln.trainer.commands.common import open_checkpoint
    from kiln.trainer.commands.serving import EXPERTFLOW_DIR

    if min(args.sequences, args.heldout, args.steps, args.dim, args.layers) < 1:
        raise ConfigError("--sequences, --heldout, --steps, --dim and --layers must be >= 1")
    ckpt = open_checkpoint(args.ckpt)
    if ckpt.recipe.model.mlp != "moe":
        raise ConfigError(f"{ckpt.tag_dir} is a dense model (model.mlp={ckpt.recipe.model.mlp}): "
                          "ExpertFlow predicts MoE routes")
    model = ckpt.model()
    seq = ckpt.recipe.data.seq_len
    rows = 16
    t0 = time.perf_counter()
    train = ChunkLoader(ckpt.data.train_prefix, seq, rows, 0, 1, seed=args.seed)
    toks, routes = P.record_routes(model, train.eval_batches(-(-args.sequences // rows)))
    valid = ChunkLoader(ckpt.data.valid_prefix, seq, rows, 0, 1, seed=args.seed)
    vt, vr = P.record_routes(model, valid.eval_batches(-(-args.heldout // rows)))
    if vt.shape[0] == 0:
        raise ConfigError(f"the held-out split has no window of {seq} tokens to score the predictor on")
    print(f"kiln expertflow: recorded {toks.numel():,} training and {vt.numel():,} held-out tokens' routes "
          f"({routes.shape[2]} MoE layers, top-{routes.shape[3]}) in {time.perf_counter() - t0:.1f}s")
    cfg = P.PredictorConfig(vocab_size=model.cfg.vocab_size, layers=routes.shape[2],
                            experts=model.cfg.moe.num_experts, top_k=routes.shape[3], dim=args.dim,
                            n_layers=args.layers)
    pred = P.train_predictor(toks, routes, cfg, steps=args.steps, seed=args.seed, log=print)
    freq = P.frequency(routes, cfg.experts)
    scores = {f"batch{b}": P.route_metrics(pred, vt, vr, freq, batch_tokens=b) for b in (1, 32)}
    s1 = scores["batch1"]
    folder = P.save_predictor(pred, args.store or ckpt.tag_dir / EXPERTFLOW_DIR, {
        "checkpoint": str(ckpt.tag_dir), "train_tokens": toks.numel(), "heldout_tokens": vt.numel(),
        "steps": args.steps, "seed": args.seed, "scores": scores})
    per = " ".join(f"{s1[f'token/accuracy_l{l}']:.2f}/{s1[f'token/baseline_accuracy_l{l}']:.2f}"
                   for l in range(cfg.layers))
    b32 = scores["batch32"]
    print(f"  held-out top-{cfg.top_k} accuracy per layer (predictor/frequency): {per}\n"
          f"  overall {s1['token/accuracy']:.3f} vs {s1['token/baseline_accuracy']:.3f}; a 32-token step's expert "
          f"set: precision {b32['batch/precision']:.3f} recall {b32['batch/recall']:.3f} "
          f"(frequency {b32['batch/baseline_precision']:.3f} / {b32['batch/baseline_recall']:.3f})\n"
          f"  saved -> {folder}")
    return 0
