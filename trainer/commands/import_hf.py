"""`kiln import-hf DIR --out RUN_DIR [--recipe R] [--set K=V]`: start a kiln run from a local
Hugging Face Llama or Mixtral checkpoint and its tokenizer.

RUN_DIR gets recipe.yaml (R's sections, or the defaults, with the model section read from
config.json and data.tokenizer pointing at RUN_DIR/tokenizer.json, a copy of DIR's) and a
step-0 checkpoint holding the weights in fp32 (the kind `kiln grow` writes), so that
`kiln train RUN_DIR/recipe.yaml` trains on from them with a fresh optimizer.
"""
import json
import shutil
from pathlib import Path

from kiln.trainer.config import ConfigError

# model.* keys --set may change: training-only coefficients; every other model key is the checkpoint's
TRAINING_ONLY = {"aux_loss_coef", "z_loss_coef"}


def add_parser(sub) -> None:
    """Declare `kiln import-hf`'s arguments."""
    p = sub.add_parser("import-hf", help="start a run from a local Hugging Face Llama/Mixtral checkpoint",
                       description="Write a run directory whose recipe's model is DIR's (config.json), whose "
                                   "tokenizer is DIR's tokenizer.json and whose first checkpoint holds DIR's "
                                   "weights; continue it with `kiln train RUN_DIR/recipe.yaml`.")
    p.add_argument("dir", help="a local HF checkpoint folder: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--out", required=True, help="the new run directory (must not exist)")
    p.add_argument("--recipe", help="recipe whose data/train/optim/... sections the run takes "
                                    "(default: kiln's defaults); its model section is replaced")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=50 (repeatable)")


def read_hf_dir(d: Path):
    """(config.json dict, HF-named tensors) of the checkpoint folder d, or one-line errors."""
    from safetensors.torch import load_file

    if not (d / "config.json").is_file():
        raise ConfigError(f"{d} has no config.json: pass a Hugging Face checkpoint folder "
                          "(config.json, *.safetensors, tokenizer.json)")
    try:
        config = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{d / 'config.json'} is not valid JSON ({type(e).__name__}): fix or re-download it") from None
    files = sorted(d.glob("*.safetensors"))
    if not files:
        extra = " (only PyTorch .bin files: re-save it with save_pretrained(safe_serialization=True))" \
            if list(d.glob("*.bin")) else ""
        raise ConfigError(f"{d} holds no .safetensors weights{extra}")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise ConfigError(f"{f} cannot be read as safetensors ({str(e).splitlines()[0][:120]}): "
                              "re-download or re-save it") from None
    return config, state


def _pad_vocab(state: dict, vocab: int, tied: bool) -> dict:
    """Rows for tokens the kiln tokenizer adds (its special tokens): the mean embedding (and head)
    row, a neutral start for tokens the checkpoint never saw."""
    import torch

    out = dict(state)
    names = ["embed.weight"] + ([] if tied else ["head.weight"])
    for n in names:
        w = state[n]
        out[n] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab - w.shape[0], -1)])
    return out


def run(args) -> int:
    """Write the run directory and say how to train on."""
    import dataclasses

    from kiln.data.errors import DataError
    from kiln.data.tokenizer import load_tokenizer
    from kiln.model import Transformer, hf, param_count
    from kiln.trainer.config import from_dict, load_yaml, merge, parse_overrides, to_dict
    from kiln.trainer.growth import write_grown_checkpoint

    src, out = Path(args.dir), Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out} exists: name a new folder (kiln import-hf never overwrites a run)")
    if not src.is_dir():
        raise ConfigError(f"{src} is not a folder: pass a local Hugging Face checkpoint folder")
    overrides = parse_overrides(args.set)
    model_keys = {k for k in overrides.get("model", {}) if k != "moe"} | \
        {k for k in overrides.get("model", {}).get("moe", {}) if k not in TRAINING_ONLY}
    if model_keys:
        raise ConfigError(f"--set model.{sorted(model_keys)[0]}: the model comes from {src / 'config.json'}; "
                          f"only model.moe.{'/'.join(sorted(TRAINING_ONLY))} may be set")
    config, hf_state = read_hf_dir(src)
    try:
        cfg = hf.model_config_from_hf(config)
        state = hf.from_hf_state({k: v.float() for k, v in hf_state.items()}, cfg)
    except hf.Unmappable as e:
        raise ConfigError(f"{src}: {e}") from None
    if not (src / "tokenizer.json").is_file():
        raise ConfigError(f"{src} has no tokenizer.json: write one with transformers' "
                          f"AutoTokenizer.from_pretrained('{src}').save_pretrained('{src}')")
    try:
        vocab = load_tokenizer(src / "tokenizer.json").get_vocab_size()  # with kiln's special tokens
    except DataError as e:
        raise ConfigError(f"{src / 'tokenizer.json'}: {e}") from None
    padded = ""
    if vocab > cfg.vocab_size:
        new = -(-vocab // 64) * 64
        state = _pad_vocab(state, new, cfg.tie_embeddings)
        padded = f" (vocabulary {cfg.vocab_size} -> {new}: kiln's special tokens added, mean-embedding rows)"
        cfg = dataclasses.replace(cfg, vocab_size=new)

    base = load_yaml(args.recipe) if args.recipe else {}
    values = merge(merge(base, {"model": {}}), overrides)
    moe_extra = values.get("model", {}).get("moe", {})
    values["model"] = dataclasses.asdict(cfg)
    values["model"]["moe"].update({k: v for k, v in moe_extra.items() if k in TRAINING_ONLY})
    values.setdefault("data", {})
    out.mkdir(parents=True)
    try:
        tok_path = (out / "tokenizer.json").resolve()
        shutil.copyfile(src / "tokenizer.json", tok_path)
        values["data"]["tokenizer"] = str(tok_path)
        values["growth"] = {"op": "none"}
        values.setdefault("train", {}).update(name=out.name, run_root=str(out.resolve().parent))
        recipe = to_dict(from_dict(values))
        model = Transformer(cfg)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"{src}'s weights do not fit its config.json ({str(e).splitlines()[-1].strip()[:160]})") \
                from None
        n = param_count(cfg)
        write_grown_checkpoint(out, recipe, model.state_dict(), {"stage": 0, "step": 0, "tokens": 0, "flops": 0.0},
                               (n, n))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written run directory left behind
        raise
    print(f"kiln import-hf: {src} ({hf.architecture(cfg)}, {n:,} parameters) -> {out}{padded}\n"
          f"  tokenizer: {tok_path}\n"
          f"  continue with: kiln train {out / 'recipe.yaml'}"
          + ("" if args.recipe else "  (kiln's default data and steps: set data.source and train.steps there)"))
    return 0
