"""`kiln place` and `kiln profile-routing`: placement solving and held-out routing profiles.

Both run in one process, without torch.distributed: `profile-routing` rebuilds the model
unsharded from a checkpoint (experts are read by (layer, expert) from kiln's expert files, so any
placement and expert-parallel size loads) and routes held-out batches; `place` solves MoETuner's
ILP on a run's latest profile and writes <run>/placement.json.
"""
from pathlib import Path

import numpy as np

from kiln.parallel.expert import contiguous_placement
from kiln.parallel.placement import place
from kiln.parallel.placement.io import PlacementError, RoutingProfile
from kiln.parallel.placement.metrics import Topology, evaluate
from kiln.parallel.routing import RoutingProfiler, latest_profile, placement_quality, save_profile
from kiln.trainer.config import ConfigError, load_recipe
from kiln.trainer.hooks.moe import cost_model


def _run_recipe(run_dir: Path):
    f = run_dir / "recipe.yaml"
    if not f.is_file():
        raise ConfigError(f"{run_dir} is not a kiln run directory (no recipe.yaml): pass e.g. runs/moe_tiny")
    return load_recipe(f, saved=True)


def place_run(run_dir, ranks: int | None = None, nodes: int = 1, time_limit: float = 60.0,
              profile: str | None = None, strategy: str = "ilp", refine: bool = False,
              min_balance: float = 0.95, coselect: bool | None = None):
    """Solve the placement for `run_dir`'s latest routing profile; write run_dir/placement.json.
    `coselect` (None: as the run's parallel.moe_dedup) adds the co-selection objective, which
    cuts all-to-all bytes under dedup dispatch. Returns (PlacementResult, contiguous metrics dict, path)."""
    run_dir = Path(run_dir)
    recipe = _run_recipe(run_dir)
    if recipe.model.mlp != "moe":
        raise ConfigError(f"{run_dir} trains a dense model (model.mlp={recipe.model.mlp}): nothing to place")
    ranks = ranks or recipe.parallel.ep
    if ranks < 2:
        raise ConfigError("the run has parallel.ep=1: pass --ranks R (the expert-parallel size to place for)")
    path = Path(profile) if profile else latest_profile(run_dir)
    if not path.is_file():
        raise PlacementError(f"no routing profile at {path}: train with parallel.profile_every > 0 or run "
                             f"`kiln profile-routing {run_dir}` first")
    prof = RoutingProfile.load(str(path))
    topo = Topology(ranks=ranks, nodes=nodes)
    cost = cost_model(recipe.model, bf16=recipe.train.precision != "fp32")
    if coselect is None:
        coselect = strategy == "ilp" and recipe.parallel.moe_dedup and prof.coselect is not None
    res = place(prof, strategy, topo, cost, time_limit=time_limit, refine=refine, min_balance=min_balance,
                coselect=coselect)
    base = evaluate(prof, contiguous_placement(prof.layers, prof.experts, ranks), topo, cost).to_dict()
    res.solver = {**res.solver, "profile": str(path)}
    out = run_dir / "placement.json"
    res.to_json(str(out))
    return res, base, out


def profile_checkpoint(path, batches: int = 16, out: str | None = None):
    """Route `batches` held-out batches through a checkpoint's model; save and return the profile.
    Returns (RoutingProfile, saved path, quality dict under the run's placement or per expert,
    held-out loss of those batches)."""
    from kiln.data.loader import ChunkLoader
    from kiln.infer.evaluate import heldout_loss
    from kiln.parallel.expert_state import saved_placement
    from kiln.trainer.commands.common import open_checkpoint

    ckpt = open_checkpoint(Path(path))
    recipe, tag_dir = ckpt.recipe, ckpt.tag_dir
    run_dir = tag_dir.parent.parent
    if recipe.model.mlp != "moe":
        raise ConfigError(f"{tag_dir} is a dense model (model.mlp={recipe.model.mlp}): no routing to profile")
    model = ckpt.model()
    profiler = RoutingProfiler(model)
    t = recipe.train
    loader = ChunkLoader(ckpt.data.valid_prefix, recipe.data.seq_len, t.micro_batch, 0, 1, t.seed)
    held = heldout_loss(model, loader.eval_batches(batches))
    prof = profiler.snapshot("profile")
    if prof is None:
        raise ConfigError(f"the held-out split of {recipe.data.source} gave no batches to profile")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        prof.save(out)
        saved = Path(out)
    else:
        saved = save_profile(prof, run_dir, name=f"routing_heldout_{tag_dir.name}.npz")
    placement = saved_placement(tag_dir)
    ranks = int(placement.max()) + 1 if placement is not None else 0
    quality = placement_quality(prof, placement, ranks)
    return prof, saved, quality, held


def format_place(res, base: dict, out: Path) -> str:
    """The console report of `kiln place`."""
    m = res.metrics
    gap = res.solver.get("gap")
    lines = [f"kiln place: {res.strategy} placement for {res.ranks} ranks on {res.nodes} node(s) -> {out}",
             f"  {'':22}{'contiguous':>12}{res.strategy:>12}",
             f"  {'balancedness (mean)':22}{base['balancedness_mean']:>12.3f}{m['balancedness_mean']:>12.3f}",
             f"  {'balancedness (min)':22}{base['balancedness_min']:>12.3f}{m['balancedness_min']:>12.3f}",
             f"  {'cross-rank fraction':22}{base['cross_rank_fraction']:>12.3f}{m['cross_rank_fraction']:>12.3f}",
             f"  {'modelled step (ms)':22}{1e3 * base['step_time_s']:>12.4f}{1e3 * m['step_time_s']:>12.4f}"]
    if gap is not None:
        lines.append(f"  solver: gap {gap:.4f}, {res.solver.get('solve_time_s', 0):.1f}s "
                     f"(limit {res.solver.get('time_limit_s')}s)")
    cos = res.solver.get("coselect")
    if cos:
        lines.append(f"  co-selection: {cos['kept_pairs_before'] / max(cos['pairs'], 1):.3f} -> "
                     f"{cos['kept_fraction']:.3f} of the pairs a token chooses together on one rank "
                     "(fewer all-to-all rows under parallel.moe_dedup)")
    lines.append(f"  resume with: --set parallel.placement={out}")
    return "\n".join(lines)


def format_profile(prof: RoutingProfile, saved: Path, quality: dict, held: dict) -> str:
    """The console report of `kiln profile-routing`."""
    per = [f"{quality[k]:.2f}" for k in sorted(q for q in quality if q.startswith("moe/balance/l"))]
    lines = [f"kiln profile-routing: {prof.tokens:,} held-out tokens, {prof.layers} MoE layers x "
             f"{prof.experts} experts (top-{prof.top_k}) -> {saved}",
             f"  held-out loss on them: {held['loss']:.4f} (ppl {held['ppl']:.2f})",
             f"  balancedness per layer: {' '.join(per)}"]
    if "moe/cross_rank_frac" in quality:
        lines.append(f"  cross-rank fraction: {quality['moe/cross_rank_frac']:.3f}")
    lines.append(f"  load per expert (layer 0): {np.round(prof.load[0]).astype(int).tolist()}")
    return "\n".join(lines)
