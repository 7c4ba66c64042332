"""`kiln export CKPT --format hf|fp32 --out DIR`: a checkpoint's fp32 weights out of kiln.

hf: a Hugging Face folder (LlamaForCausalLM or MixtralForCausalLM: safetensors, config.json,
tokenizer) that lm-eval-harness and vLLM read, checked by the parity gate (kiln.infer.hf_gate)
right after writing. fp32: DeepSpeed's consolidation of the ZeRO shards (kiln.infer.load) as one
model.safetensors plus kiln_model.json, read back and compared after writing.
"""
import time
from pathlib import Path

from kiln.trainer.config import ConfigError

GATE_TEXTS = 8  # held-out documents the tokenizer check encodes both ways


def add_parser(sub) -> None:
    """Declare `kiln export`'s arguments."""
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face model or one fp32 file",
                       description="Write a checkpoint's fp32 weights: --format hf a transformers checkpoint "
                                   "(Llama or Mixtral, with the tokenizer), checked against kiln by the parity "
                                   "gate; --format fp32 the ZeRO shards consolidated into one safetensors file.")
    p.add_argument("ckpt", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--format", default="hf", choices=["hf", "fp32"], help="hf (default) or fp32")
    p.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="hf: the weights' dtype (default float32; the gate then compares kiln's model "
                        "with its weights rounded the same way)")


def check_out(out: Path) -> None:
    """--out must be a new or empty folder: an export never mixes with or overwrites other files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder: name a new one "
                          "(kiln export never overwrites)")


def gate_texts(data, n: int = GATE_TEXTS) -> list[str]:
    """Up to n held-out documents as text (decoded from the run's own tokens), plus a fixed
    sample of whitespace, punctuation and non-ASCII the corpus may lack."""
    from kiln.data.indexed import open_indexed

    tok = data.tokenizer()
    tokens, starts, ends = open_indexed(data.valid_prefix)
    texts = [tok.decode([int(t) for t in tokens[s:min(e, s + 512)] if int(t) != data.eot_id],
                        skip_special_tokens=False) for s, e in zip(starts[:n], ends[:n])]
    return texts + ["Tabs\tand  double  spaces,\n\nblank lines; caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600 1,234.5"]


def load(ckpt):
    """The checkpoint's model in fp32: Opened.model() (kiln.infer.load: DeepSpeed's consolidation of
    ZeRO 1-3, kiln's expert files), or the weights file of a `kiln grow` / `kiln import-hf`
    checkpoint, which holds no DeepSpeed files until it is trained."""
    import torch

    from kiln.model import Transformer
    from kiln.trainer.growth import GROWN_FILE

    grown = ckpt.tag_dir / GROWN_FILE
    if not grown.is_file():
        return ckpt.model()
    model = Transformer(ckpt.model_config())
    model.load_state_dict(torch.load(grown, map_location="cpu", weights_only=True))
    return model.eval()


def run(args) -> int:
    """Export, check, and say what was written."""
    from kiln.infer.hf_export import read_fp32, rounded, write_fp32, write_hf
    from kiln.model import hf
    from kiln.trainer.commands.common import open_checkpoint

    if args.format == "fp32" and args.dtype != "float32":
        raise ConfigError("--format fp32 writes float32: drop --dtype, or use --format hf --dtype bfloat16")
    out = Path(args.out)
    check_out(out)
    ckpt = open_checkpoint(args.ckpt)
    if args.format == "hf":
        try:
            hf.architecture(ckpt.model_config())  # refuse before reading any weights
        except hf.Unmappable as e:
            raise ConfigError(str(e)) from None
    t0 = time.perf_counter()
    model = load(ckpt)
    if args.format == "fp32":
        import torch

        written = write_fp32(model, out)
        back = read_fp32(out).state_dict()
        same = all(torch.equal(back[k], v.float()) for k, v in model.state_dict().items())
        print(f"kiln export: {ckpt.tag_dir} -> {out / 'model.safetensors'} ({written['params']:,} fp32 parameters, "
              f"DeepSpeed's consolidation of ZeRO stage {ckpt.recipe.parallel.zero_stage}) in "
              f"{time.perf_counter() - t0:.1f} s")
        if not same:
            print("kiln export: FAILED: the file read back differs from the checkpoint's weights")
            return 1
        print("  checked: the file read back equals the checkpoint's weights tensor for tensor")
        return 0
    from kiln.infer.hf_gate import run_gate

    data = ckpt.data
    written = write_hf(model, data.tokenizer(), out, ckpt.recipe.data.seq_len, args.dtype)
    t1 = time.perf_counter()
    print(f"kiln export: {ckpt.tag_dir} -> {out} as {written['architecture']} ({written['params']:,} parameters, "
          f"{args.dtype}, {', '.join(written['files'])} + config.json + tokenizer) in {t1 - t0:.1f} s")
    report = run_gate(rounded(model, args.dtype), out, data.tokenizer(), gate_texts(data), seed=ckpt.recipe.train.seed)
    print(f"  {report.line()} ({time.perf_counter() - t1:.1f} s)")
    if not report.ok:
        print(f"kiln export: the export in {out} does not compute what kiln does; it is kept for inspection")
        return 1
    print(f"  use it: transformers AutoModelForCausalLM.from_pretrained('{out}'), lm_eval --model hf "
          f"--model_args pretrained={out}, vllm serve {out}")
    return 0
