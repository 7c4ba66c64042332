"""Writing a loaded kiln model out: a Hugging Face folder (safetensors, config.json,
generation_config.json, tokenizer) or one fp32 safetensors file with kiln's model config.

The weights come from kiln.infer.load (DeepSpeed's own ZeRO consolidation, kiln's expert files),
so both formats hold the fp32 master weights of any checkpoint. The mapping is kiln.model.hf's.
"""
import dataclasses
import json
from pathlib import Path

import torch

from kiln.data.tokenizer import EOT, MASK, PAD
from kiln.model import hf

SHARD_BYTES = 4 * 2**30  # transformers' and vLLM's readers take an index of shards this size


def _save_shards(state: dict, out: Path, stem: str = "model") -> list[str]:
    """Write `state` as `stem.safetensors`, or shards plus the index transformers reads."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(state, str(out / f"{stem}.safetensors"), metadata={"format": "pt"})
        return [f"{stem}.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        f = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(out / f), metadata={"format": "pt"})
        files.append(f)
        weight_map.update({n: f for n in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def write_tokenizer(tok, out: Path, max_len: int) -> None:
    """tokenizer.json plus the tokenizer_config.json AutoTokenizer needs (EOT as eos, PAD as pad)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=PAD, mask_token=MASK,
                                   model_max_length=max_len, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    # transformers 5 names its class TokenizersBackend; 4.x (and vLLM built on it) knows only
    # PreTrainedTokenizerFast, which 5 still resolves: name that one
    cfg_path = out / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("backend", None)
    cfg_path.write_text(json.dumps(tc, indent=2) + "\n")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rounded(model, dtype: str):
    """`model` itself for float32; else an fp32 copy whose weights are rounded to `dtype`: the
    function a `dtype` export computes, for the parity gate to compare against."""
    if dtype == "float32":
        return model
    from kiln.model import Transformer

    copy = Transformer(model.cfg)
    copy.load_state_dict({k: v.detach().to(DTYPES[dtype]).float() for k, v in model.state_dict().items()})
    return copy.eval()


def write_hf(model, tok, out: Path, max_positions: int, dtype: str = "float32") -> dict:
    """Write `model` (a kiln Transformer) and its tokenizer as an HF checkpoint in `out`, its
    weights in `dtype` (float32 or bfloat16).

    Returns what was written: the architecture, files and parameter count. Raises
    kiln.model.hf.Unmappable before writing anything when the model has no HF counterpart.
    """
    from transformers import GenerationConfig

    cfg = model.cfg
    eos, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    config = hf.hf_config(cfg, max_positions, eos, pad)  # refuses an unmappable model first
    state = hf.to_hf_state({k: v.detach().float().to(DTYPES[dtype]) for k, v in model.state_dict().items()}, cfg)
    out.mkdir(parents=True, exist_ok=True)
    files = _save_shards(state, out)
    config.save_pretrained(str(out))
    # readers on transformers 4.x (and vLLM on them) take rope_theta at the top level, and their
    # dtype from torch_dtype; without these they would use theta 10000 and guess the dtype
    c = json.loads((out / "config.json").read_text())
    c.update(rope_theta=float(cfg.rope_theta), torch_dtype=dtype, dtype=dtype)
    (out / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad).save_pretrained(str(out))
    write_tokenizer(tok, out, max_positions)
    return {"architecture": config.architectures[0], "files": files, "dtype": dtype,
            "params": sum(t.numel() for t in state.values())}


def write_fp32(model, out: Path) -> dict:
    """Write `model`'s weights (kiln names, fp32) as one model.safetensors plus kiln_model.json,
    the model config that rebuilds it: Transformer(ModelConfig(**json)).load_state_dict(file)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # tied heads have no tensor of their own (the embedding is the head): state_dict has no key
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "kiln": "fp32"})
    (out / "kiln_model.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
    return {"files": ["model.safetensors", "kiln_model.json"], "params": sum(t.numel() for t in state.values())}


def read_fp32(out: Path):
    """The kiln Transformer that write_fp32 wrote to `out` (fp32, eval mode)."""
    from safetensors.torch import load_file

    from kiln.model import ModelConfig, MoEConfig, Transformer

    c = json.loads((Path(out) / "kiln_model.json").read_text())
    cfg = ModelConfig(**{**c, "moe": MoEConfig(**c["moe"])})
    model = Transformer(cfg)
    model.load_state_dict(load_file(str(Path(out) / "model.safetensors")))
    return model.eval()


def hf_state_on_disk(out: Path) -> dict:
    """Every tensor of the HF checkpoint in `out` (one file or shards), as written."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state

