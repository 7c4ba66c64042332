"""`kiln eval CKPT --task ppl`: held-out loss and perplexity of a checkpoint (kiln.infer.evaluate),
optionally with its experts offloaded (identical numbers: only where the weights live changes)."""
from kiln.trainer.commands.serving import add_checkpoint_args, report_metrics, serving_model
from kiln.trainer.config import ConfigError

TASKS = ("ppl", "kv_retrieval", "probe")  # kv_retrieval: trainer/commands/eval_kv.py; probe: eval_probe.py


def add_parser(sub) -> None:
    """Declare `kiln eval`'s arguments."""
    from kiln.trainer.commands import eval_kv, eval_probe

    g = sub.add_parser("eval", help="evaluate a checkpoint (held-out perplexity, kv_retrieval, probe)",
                       description="Evaluate a checkpoint on its run's held-out split.")
    add_checkpoint_args(g)
    g.add_argument("--task", default="ppl", help=f"what to evaluate: {', '.join(TASKS)} (default ppl)")
    g.add_argument("--batches", type=int, default=0,
                   help="held-out batches of data.seq_len (default: the recipe's train.eval_batches)")
    eval_kv.add_args(g)
    eval_probe.add_args(g)


def run(args) -> int:
    """Evaluate and print the result; --metrics-out writes it as JSON."""
    import torch

    from kiln.data.loader import ChunkLoader
    from kiln.infer.evaluate import batch_losses, lm_loss
    from kiln.trainer.commands.common import open_checkpoint

    if args.task not in TASKS:
        raise ConfigError(f"unknown --task {args.task!r}: choose one of {', '.join(TASKS)}")
    if args.batches < 0:
        raise ConfigError(f"--batches must be >= 1 (got {args.batches})")
    if args.task == "probe" and args.offload:
        raise ConfigError("--task probe reads features of the whole model: drop --offload")
    ckpt = open_checkpoint(args.ckpt)
    if args.task != "probe" and not ckpt.recipe.model.causal:
        raise ConfigError(f"{ckpt.tag_dir} is a bidirectional encoder (model.causal=false, objective "
                          f"{ckpt.recipe.objective.name}): it has no next-token {args.task}; use --task probe")
    model, flow = serving_model(args, ckpt)
    if args.task == "kv_retrieval":
        from kiln.trainer.commands import eval_kv

        return eval_kv.run(args, ckpt, model, flow)
    if args.task == "probe":
        from kiln.trainer.commands import eval_probe

        return eval_probe.run(args, ckpt, model)
    r, t = ckpt.recipe, ckpt.recipe.train
    loader = ChunkLoader(ckpt.data.valid_prefix, r.data.seq_len, t.micro_batch, 0, 1, t.seed)

    def loss(b):
        if flow is not None:
            flow.before(b["input_ids"], b["position_ids"], torch.ones_like(b["input_ids"], dtype=torch.bool))
        return lm_loss(model, b)

    total, n = batch_losses(loss, loader.eval_batches(args.batches or t.eval_batches))
    if n == 0:
        raise ConfigError(f"the held-out split of {r.data.source} has no window of {r.data.seq_len} tokens: "
                          "evaluate a run with a larger data.heldout_percent")
    import math

    metrics = {"task": "ppl", "checkpoint": str(ckpt.tag_dir), "loss": total / n, "ppl": math.exp(total / n),
               "batches": n, "tokens": n * t.micro_batch * r.data.seq_len}
    print(f"kiln eval: {ckpt.tag_dir}: held-out loss {metrics['loss']:.4f} | ppl {metrics['ppl']:.2f} "
          f"({n} batches, {metrics['tokens']:,} tokens)")
    report_metrics(args, metrics, flow)
    return 0
