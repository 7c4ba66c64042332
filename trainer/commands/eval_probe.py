"""`kiln eval CKPT --task probe`: the options and the report around kiln.infer.tasks.probe (a linear
probe on the frozen model's mean-pooled features: which standard-library package a snippet is from)."""
from kiln.trainer.config import ConfigError


def add_args(g) -> None:
    """probe's options of `kiln eval`."""
    g.add_argument("--snippet-len", type=int, default=0,
                   help="probe: tokens per snippet (default: data.seq_len, at most 64)")
    g.add_argument("--per-class", type=int, default=48,
                   help="probe: training snippets per package, half as many held out (default 48)")
    g.add_argument("--classes", type=int, default=8, help="probe: packages to tell apart (default 8)")


def run(args, ckpt, model) -> int:
    """Fit the probe, print the held-out accuracy, and report the metrics (--metrics-out)."""
    from kiln.infer.tasks.probe import probe, stdlib_snippets
    from kiln.trainer.commands.serving import report_metrics

    length = args.snippet_len or min(64, ckpt.recipe.data.seq_len)
    if length < 2 or args.per_class < 2 or args.classes < 2:
        raise ConfigError("--snippet-len, --per-class and --classes must be at least 2 "
                          f"(got {length}, {args.per_class}, {args.classes})")
    data = stdlib_snippets(ckpt.data.tokenizer(), length, args.per_class, args.classes, seed=ckpt.recipe.train.seed)
    res = probe(model, data)
    res["checkpoint"] = str(ckpt.tag_dir)
    print(f"kiln eval: {ckpt.tag_dir}: probe accuracy {res['accuracy']:.3f} on {res['heldout_snippets']} held-out "
          f"snippets (chance {res['chance']:.3f}; train {res['train_accuracy']:.3f}; {len(res['classes'])} "
          f"packages: {', '.join(res['classes'])})")
    report_metrics(args, res, None)
    return 0
