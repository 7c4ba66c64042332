"""`kiln generate CKPT --prompt TEXT | --prompts FILE`: decode from a checkpoint with a KV cache
(kiln.infer.generate), greedy or sampled, optionally with its experts offloaded (ExpertFlow) and
requests grouped by predicted route (--schedule)."""
import json
from pathlib import Path

from kiln.trainer.commands.serving import add_checkpoint_args, report_metrics, serving_model
from kiln.trainer.config import ConfigError


def add_parser(sub) -> None:
    """Declare `kiln generate`'s arguments."""
    g = sub.add_parser("generate", help="generate text from a checkpoint",
                       description="Continue prompts with a checkpoint's model (KV-cached decoding).")
    add_checkpoint_args(g)
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--prompts", metavar="FILE", help="prompts, one per line (or .jsonl with a \"prompt\" field)")
    g.add_argument("--max-new", type=int, default=64, metavar="N", help="tokens to generate per prompt (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p probability mass (1 = all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    g.add_argument("--schedule", action="store_true",
                   help="with --offload and a predictor: batch prompts whose predicted routes are alike")


def read_prompts(args) -> list[str]:
    """The prompts of --prompt and --prompts, in order; one line each for bad files."""
    texts = list(args.prompt)
    if args.prompts:
        f = Path(args.prompts)
        if not f.is_file():
            raise ConfigError(f"--prompts {f} is not a file: pass a text file with one prompt per line")
        try:
            lines = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise ConfigError(f"--prompts {f} is not UTF-8 text: save it as UTF-8") from None
        if f.suffix == ".jsonl":
            try:
                lines = [json.loads(ln)["prompt"] for ln in lines]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"--prompts {f}: every line of a .jsonl file needs a \"prompt\" field") from None
        if not lines:
            raise ConfigError(f"--prompts {f} holds no prompts: write one prompt per line")
        texts += lines
    if not texts:
        raise ConfigError("kiln generate needs --prompt TEXT or --prompts FILE")
    return texts


def run(args) -> int:
    """Generate, print every prompt with its continuation, and report the metrics."""
    import time

    from kiln.data.tokenizer import special_ids
    from kiln.infer.errors import InferError
    from kiln.infer.expertflow.runtime import run_batches
    from kiln.infer.generate import Sampling, generate
    from kiln.trainer.commands.common import open_checkpoint

    if args.max_new < 1 or args.batch_size < 1:
        raise ConfigError("--max-new and --batch-size must be >= 1")
    texts = read_prompts(args)
    ckpt = open_checkpoint(args.ckpt)
    tok = ckpt.data.tokenizer()
    prompts = [tok.encode(t).ids for t in texts]
    for t, p in zip(texts, prompts):
        if not p:
            raise ConfigError(f"prompt {t!r} encodes to no tokens: give it some text")
    model, flow = serving_model(args, ckpt)
    if args.schedule and (flow is None or flow.predictor is None):
        raise ConfigError("--schedule groups prompts by predicted route: it needs --offload and a trained predictor")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    eot = special_ids(tok).eot
    hook = flow.before if flow is not None else None
    t0 = time.perf_counter()
    try:
        outs = run_batches(prompts, args.batch_size,
                           lambda batch: generate(model, batch, args.max_new, sampling, eot=eot, on_step=hook),
                           flow, scheduled=args.schedule)
    except InferError as e:
        raise ConfigError(str(e)) from None
    elapsed = time.perf_counter() - t0
    for text, out in zip(texts, outs):
        print(f"--- {text}\n{text}{tok.decode(out)}")
    new = sum(len(o) for o in outs)
    print(f"\nkiln generate: {len(texts)} prompts, {new} new tokens in {elapsed:.1f}s ({new / elapsed:.1f} tok/s)")
    report_metrics(args, {"prompts": len(texts), "new_tokens": new, "seconds": elapsed,
                          "outputs": [tok.decode(o) for o in outs]}, flow)
    return 0
