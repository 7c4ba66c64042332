"""A kiln checkpoint's model as one unsharded fp32 model on one process, whatever wrote it.

* ZeRO 1-3 without expert parallelism: DeepSpeed's own consolidation of the fp32 master weights
  (`get_fp32_state_dict_from_zero_checkpoint`), never the module file, which a bf16 run saves in
  bf16 and ZeRO-3 saves partitioned;
* ZeRO 0, and expert-parallel runs (DeepSpeed's MoE param groups; its module file holds rank 0's
  bank rows only): the module file for the dense weights, and every expert from kiln's expert
  files by (layer, expert), the fp32 master rows (kiln.parallel.expert_state), whatever the
  world size and placement that wrote them.
Names are kiln.model.Transformer's (`layers.<i>...`), so growth operators and tools can use them.
Only the objective's trained model (its `model.` submodule) is returned: for ELECTRA that is the
discriminator alone (the generator `gen.` and the replaced-token head `rtd.` stay behind), so
`kiln eval` and `kiln export` see the encoder; `part="gen"` or `"rtd"` reads those instead.
The caller resolves the model config (the trainer owns recipes); this module reads weights only.
Every file is checked against the checkpoint's manifest before DeepSpeed's files (full pickle)
are opened (kiln.infer.checkpoint_manifest); kiln's own expert files load with weights_only=True.
"""
from pathlib import Path

import torch

from kiln.infer.errors import InferError
from kiln.model import Transformer
from kiln.model.transformer import mlp_kind


def checkpoint_state(tag_dir: Path, model_cfg, zero_stage: int, part: str = "model") -> dict:
    """The fp32 state dict of the checkpoint `tag_dir` for a model of `model_cfg`: the objective's
    submodule `part` (default the trained model; see the module doc)."""
    from kiln.parallel.expert_state import expert_files, read_full_experts

    tag_dir = Path(tag_dir)
    check_manifest(tag_dir)
    sharded_experts = bool(expert_files(tag_dir))
    if zero_stage >= 1 and not sharded_experts:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    prefix = part + "."
    state = {k.removeprefix(prefix): v.float() for k, v in state.items()
             if k.startswith(prefix) and "expert_bank." not in k and "deepspeed_moe_marker" not in k}
    if sharded_experts and part == "model":
        full = read_full_experts(tag_dir)
        moe_layers = [i for i in range(model_cfg.n_layers) if mlp_kind(model_cfg, i) == "moe"]
        for l, i in enumerate(moe_layers):
            for w in ("w1", "w3", "w2"):
                state[f"layers.{i}.mlp.experts.{w}"] = full[w][l].float()
    return state


def check_manifest(tag_dir: Path) -> None:
    """Refuse (one line, naming the file) a checkpoint whose files fail its manifest; one line on
    stderr for a checkpoint without one (saved before kiln wrote manifests: nothing to check)."""
    import sys

    from kiln.infer.checkpoint_manifest import verify_manifest

    if not verify_manifest(tag_dir):
        print(f"kiln: warning: checkpoint {tag_dir} has no manifest (saved by an older kiln): its files "
              "are not verified before they are read", file=sys.stderr)


def load_model(tag_dir: Path, model_cfg, zero_stage: int) -> Transformer:
    """The model of a checkpoint in fp32 on the CPU, in eval mode (see the module doc)."""
    if not any(Path(tag_dir).glob("*mp_rank_00_model_states.pt")):  # ZeRO-3 writes zero_pp_rank_<r>_...
        raise InferError(f"{tag_dir} holds no model states (mp_rank_00_model_states.pt): pass a kiln "
                         "checkpoint directory, e.g. runs/tiny/checkpoints/step_00000400")
    model = Transformer(model_cfg)
    result = model.load_state_dict(checkpoint_state(tag_dir, model_cfg, zero_stage), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InferError(f"checkpoint {tag_dir} does not match its recipe's model (missing "
                         f"{sorted(result.missing_keys)[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval()
