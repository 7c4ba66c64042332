"""What `kiln generate`, `kiln eval` and `kiln expertflow` share: opening a checkpoint for
inference, the offload options, and the metrics they print and write."""
import json
from pathlib import Path

from kiln.trainer.config import ConfigError

EXPERTFLOW_DIR = "expertflow"   # beside the checkpoint's files: expert store and predictor


def add_checkpoint_args(p) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="run directory (newest checkpoint) or a checkpoint directory")
    p.add_argument("--offload", action="store_true",
                   help="MoE only: keep experts in a slow tier (memory-mapped file on CPU, pinned host "
                        "memory on CUDA) with --cache-experts slots per layer (ExpertFlow)")
    p.add_argument("--cache-experts", type=int, default=0, metavar="K",
                   help="fast-tier expert slots per MoE layer with --offload (default: a quarter of the experts)")
    p.add_argument("--no-predictor", action="store_true",
                   help="with --offload: plain LRU loading on demand, no routing-path prefetch")
    p.add_argument("--store", metavar="DIR", help="where the expert store and predictor live "
                                                  "(default: CKPT/expertflow)")
    p.add_argument("--metrics-out", metavar="FILE", help="write the metrics as JSON here")


def expertflow_dir(args, ckpt) -> Path:
    return Path(args.store) if args.store else ckpt.tag_dir / EXPERTFLOW_DIR


def serving_model(args, ckpt, log=print):
    """(model, ExpertFlow or None) for the command's options."""
    model = ckpt.model()
    if not args.offload:
        if args.cache_experts or args.no_predictor:
            raise ConfigError("--cache-experts and --no-predictor apply with --offload: add --offload")
        return model, None
    from kiln.infer.expertflow.predictor import MANIFEST, load_predictor
    from kiln.infer.expertflow.runtime import ExpertFlow

    if model.cfg.mlp != "moe":
        raise ConfigError(f"--offload serves MoE experts, and {ckpt.tag_dir} is a dense model "
                          f"(model.mlp={model.cfg.mlp}): drop --offload")
    experts = model.cfg.moe.num_experts
    slots = args.cache_experts or max(1, experts // 4)
    if not 1 <= slots <= experts:
        raise ConfigError(f"--cache-experts {slots} must be between 1 and the model's {experts} experts per layer")
    folder = expertflow_dir(args, ckpt)
    predictor = None
    if not args.no_predictor:
        if (folder / MANIFEST).is_file():
            predictor = load_predictor(folder)
        else:
            log(f"kiln: no routing predictor in {folder}: loading experts on demand (LRU); "
                f"`kiln expertflow train-predictor {args.ckpt}` trains one")
    try:
        flow = ExpertFlow.build(model, folder / "experts.safetensors", slots, predictor)
    except OSError as e:
        raise ConfigError(f"cannot write the expert store in {folder} ({e.strerror or e}): pass --store DIR") from None
    return model, flow


def report_metrics(args, metrics: dict, flow) -> None:
    """Print the ExpertFlow figures (when offloading) and write --metrics-out."""
    if flow is not None:
        m = flow.metrics()
        metrics = {**metrics, "expertflow": m}
        print(f"  expertflow: {m['slots']} slots/layer, hit rate {100 * m['hit_rate']:.1f}%, "
              f"{m['loads_per_token']:.3f} experts loaded/token, {m['bytes_moved'] / 2**20:.1f} MiB moved, "
              f"{m['activated_per_batch']:.2f} activated experts/batch, fast tier {m['fast_tier_bytes'] / 2**20:.1f} MiB")
    if args.metrics_out:
        out = Path(args.metrics_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=1))
        print(f"  metrics -> {out}")
