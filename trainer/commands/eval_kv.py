"""`kiln eval CKPT --task kv_retrieval`: the options and the report around
kiln.infer.tasks.kv_retrieval (key-value needles in the run's held-out documents)."""
from kiln.trainer.config import ConfigError

DEPTHS = "0,0.25,0.5,0.75,1"


def add_args(g) -> None:
    """kv_retrieval's options of `kiln eval`."""
    g.add_argument("--lengths", default="", help="kv_retrieval: comma list of context lengths in tokens "
                   "(default: data.seq_len / 4, / 2 and x 1, at least 64)")
    g.add_argument("--depths", default=DEPTHS, help=f"kv_retrieval: comma list of needle depths in [0, 1] "
                   f"(0 = start of the context, 1 = just before the query; default {DEPTHS})")
    g.add_argument("--samples", type=int, default=20, help="kv_retrieval: cases per grid cell (default 20)")


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma list of numbers, e.g. {flag} 64,128") from None


class _Served:
    """The model with ExpertFlow's routing prediction before each forward (--offload)."""

    def __init__(self, model, flow):
        self.model, self.flow = model, flow

    def __call__(self, ids):
        import torch

        pos = torch.arange(ids.shape[1]).expand_as(ids)
        self.flow.before(ids, pos, torch.ones_like(ids, dtype=torch.bool))
        return self.model(ids)

    def logits(self, hidden):
        return self.model.logits(hidden)


def run(args, ckpt, model, flow) -> int:
    """Score the grid, print it, and report the metrics (--metrics-out)."""
    from kiln.data.indexed import open_indexed
    from kiln.infer.tasks.kv_retrieval import format_grid, kv_retrieval
    from kiln.trainer.commands.serving import report_metrics

    seq = ckpt.recipe.data.seq_len
    lengths = _numbers(args.lengths, int, "--lengths") or sorted({max(64, seq // 4), max(64, seq // 2), max(64, seq)})
    depths = _numbers(args.depths, float, "--depths")
    if min(lengths) < 1 or not depths or not all(0 <= d <= 1 for d in depths) or args.samples < 1:
        raise ConfigError("--lengths must be positive, --depths in [0, 1] and --samples >= 1 "
                          f"(got {lengths}, {depths}, {args.samples})")
    data = ckpt.data
    tokens, _, _ = open_indexed(data.valid_prefix)
    served = model if flow is None else _Served(model, flow)
    res = kv_retrieval(served, data.tokenizer(), tokens, data.eot_id, lengths, depths, args.samples,
                       seed=ckpt.recipe.train.seed)
    res["checkpoint"] = str(ckpt.tag_dir)
    print(f"kiln eval: {ckpt.tag_dir}: kv_retrieval accuracy {res['accuracy']:.3f} (token accuracy "
          f"{res['token_accuracy']:.3f}, chance {res['chance']:.4f}; {args.samples} cases per cell)")
    print(format_grid(res))
    report_metrics(args, res, flow)
    return 0
