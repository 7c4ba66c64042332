"""The transition between stages: the large stage's initial weights, grown from the small stage's
final checkpoint (kiln.growth's operators on the fp32 weights that kiln.infer.load reads).

The small stage always checkpoints its last step, so growing reads a file every rank can see, and
a run killed after the transition but before the large stage's first checkpoint grows the same
weights again from it: resuming equals not having stopped.

`kiln grow CKPT --out DIR` writes a *grown checkpoint*: a tag holding GROWN_FILE (the large
model's fp32 weights), kiln's state and the large recipe, no DeepSpeed files. `kiln train` starts
the large model from it like an in-run transition (fresh optimizer, new schedule), on any world
size and ZeRO stage.
"""
from dataclasses import dataclass

import numpy as np

from kiln.growth.ops import grow
from kiln.infer.checkpoint_manifest import write_manifest
from kiln.infer.load import checkpoint_state
from kiln.model import param_count
from kiln.trainer import checkpoint
from kiln.trainer.stage import resolve_model


GROWN_FILE = "grown_model.pt"  # tensors only: loaded with weights_only=True, no code runs


@dataclass
class Growth:
    """What a grown stage starts from."""

    state: dict            # the large model's initial weights (Transformer names, fp32)
    placement: object      # [L, E] expert placement to start from: layer i takes layer i mod L's
    progress: dict         # the small stage's final progress (step, tokens, flops)
    tag: str               # the checkpoint it grew from
    params: tuple          # (small, large) parameter counts


def grow_stage(run, small_spec, large_spec) -> Growth:
    """Grow the newest checkpoint (the small stage's last) into the large stage's weights."""
    run_dir, vocab, g = run.run_dir, run.data.vocab_size, run.recipe.growth
    tag = checkpoint.latest_tag(run_dir)
    state = checkpoint.saved_state(run_dir) or {}
    progress = state.get("progress", {})
    if tag is None or progress.get("stage", 0) != small_spec.index or progress.get("step") != small_spec.end:
        raise checkpoint.CheckpointError(
            f"growing needs the small stage's checkpoint of step {small_spec.end} in {run_dir}, found "
            f"{tag or 'none'}: resume from it or run with --no-resume")
    tag_dir = checkpoint.ckpt_root(run_dir) / tag
    small, large = resolve_model(small_spec.recipe, vocab), resolve_model(large_spec.recipe, vocab)
    weights = checkpoint_state(tag_dir, small, small_spec.recipe.parallel.zero_stage)
    grown = grow(g.op, weights, small, large, g.factor, seed=run.recipe.train.seed, noise=g.upcycle_noise)
    placement = None
    if large_spec.recipe.parallel.ep > 1:
        from kiln.parallel.expert_state import saved_placement

        placement = saved_placement(tag_dir)
        if placement is not None and g.op in ("stack", "zero"):
            placement = np.tile(placement, (g.factor, 1))
    return Growth(grown, placement, progress, tag, (param_count(small), param_count(large)))


def grown_checkpoint(run) -> Growth | None:
    """The Growth a `kiln grow` checkpoint holds, when the newest checkpoint is one (else None)."""
    tag = checkpoint.latest_tag(run.run_dir)
    f = checkpoint.ckpt_root(run.run_dir) / tag / GROWN_FILE if tag else None
    if f is None or not f.is_file():
        return None
    import torch

    state = checkpoint.saved_state(run.run_dir) or {}
    return Growth(torch.load(f, map_location="cpu", weights_only=True), None, state.get("progress", {}), tag,
                  tuple(state.get("growth", {}).get("params", (0, 0))))


def write_grown_checkpoint(out_dir, recipe_dict: dict, state: dict, progress: dict, params: tuple):
    """A run directory `out_dir` whose newest checkpoint is the grown weights (see module doc)."""
    import json
    import os

    import torch
    import yaml

    tag = checkpoint.tag_for(progress["step"])
    tag_dir = checkpoint.ckpt_root(out_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, tag_dir / GROWN_FILE)
    (tag_dir / "kiln_recipe.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    (tag_dir / "kiln_state.json").write_text(json.dumps({"progress": progress, "growth": {"params": list(params)}}))
    (out_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    write_manifest(tag_dir)  # a grown checkpoint verifies like a trained one
    latest = checkpoint.ckpt_root(out_dir) / "latest"
    tmp = latest.with_suffix(".tmp")
    tmp.write_text(tag)
    os.replace(tmp, latest)  # written last: the tag is complete
    return tag_dir


def start_weights(run, specs, spec) -> Growth | None:
    """What stage `spec` starts from besides its own checkpoint: a `kiln grow` checkpoint, or the
    grown weights of the previous stage when the newest checkpoint is that stage's end (None: the
    stage builds fresh or resumes its own checkpoint)."""
    grown = grown_checkpoint(run)
    if grown is None and spec.index > 0 and run.resume_point()[0] == spec.index - 1:
        grown = grow_stage(run, specs[spec.index - 1], spec)
    return grown
