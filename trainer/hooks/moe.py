"""The MoE hook of a stage: expert placement, routing profiles and routing metrics.

Expert parallelism itself is applied by kiln.parallel.apply.parallelize, under the placement
`start_placement` picks; `MoEHook.create` returns None for dense models.
Placement (`parallel.placement`):
  * contiguous / PATH (placement.json): applied on start; on resume the checkpoint is restored
    under the placement it was saved with and the experts then migrate to the requested one;
  * auto: start contiguous (or keep the saved placement on resume) and every
    `parallel.placement_every` steps re-solve MoETuner's ILP (plus kiln's stage 3 with
    `parallel.placement_refine`) from the latest routing profile and migrate the experts (weights
    and optimizer state) in place. With `parallel.moe_dedup` (the default) the ILP also
    co-locates experts chosen together (coselect, the training objective), within
    `parallel.placement_min_balance`.
Profiles: every `parallel.profile_every` steps the routing counts since the last profile are saved
under <run>/profiles/ (and logged to W&B as heatmaps).
"""
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kiln.parallel.expert import A2A_STATS, contiguous_placement, moe_blocks
from kiln.parallel.placement import place
from kiln.parallel.placement.io import PlacementError, PlacementResult
from kiln.parallel.placement.metrics import CostModel, Topology
from kiln.parallel.routing import RoutingProfiler, placement_quality, save_profile, wandb_heatmaps
from kiln.trainer.checkpoint import CheckpointError, ckpt_root, latest_tag
from kiln.trainer.hooks import Hook


def cost_model(model_cfg, bf16: bool) -> CostModel:
    """The placement cost model for this model's sizes (hardware figures stay the defaults)."""
    width = model_cfg.moe.expert_ffn_dim or model_cfg.hidden_dim
    return CostModel(hidden=model_cfg.dim, ffn_hidden=width, bytes_per_elem=2 if bf16 else 4)


def requested_placement(spec: str, layers: int, experts: int, ranks: int):
    """The placement `parallel.placement` asks for: an [L, E] array, or None for auto."""
    if spec == "auto":
        return None
    if spec == "contiguous":
        return contiguous_placement(layers, experts, ranks)
    return PlacementResult.from_json(spec, layers, experts, ranks).placement


def start_placement(recipe, model_cfg, run_dir, resume: bool):
    """The placement expert parallelism starts from: the resumed checkpoint's, else the one
    parallel.placement asks for (contiguous for auto); None without expert parallelism."""
    ep = recipe.parallel.ep
    saved = resume_placement(run_dir, ep) if resume else None  # refuses another parallel.ep's checkpoint
    if ep == 1:
        return None
    if saved is not None:
        return saved
    return requested_placement(recipe.parallel.placement, model_cfg.moe_layers, model_cfg.moe.num_experts, ep)


class MoEHook(Hook):
    """The MoE pieces of one rank's stage (see module doc)."""

    def __init__(self, stage):
        self.recipe, self.model, self.run_dir = stage.recipe, stage.model, Path(stage.run.run_dir)
        self.blocks = moe_blocks(self.model)
        self.layers, self.experts = len(self.blocks), self.blocks[0].num_experts
        self.ep = self.recipe.parallel.ep
        self.bf16 = stage.run.bf16
        self.profiler = RoutingProfiler(self.model)
        self.last_profile = None
        self.want = None
        if self.ep > 1:
            self.model.kiln_ep.dedup = self.recipe.parallel.moe_dedup
            self.want = requested_placement(self.recipe.parallel.placement, self.layers, self.experts, self.ep)
        self.solve = None  # an auto re-solve in flight: a _Solve on rank 0, True elsewhere
        self.routed_under = None  # the placement this log window's tokens were routed under, if it changed
        self.edp_group = stage.run.mesh.edp_group

    @classmethod
    def create(cls, stage):
        """The hook for a stage whose model has MoE blocks, else None."""
        return cls(stage) if moe_blocks(stage.model) else None

    def parts(self) -> dict:
        """Expert-parallel banks are saved by kiln itself (DeepSpeed keeps rank 0's rows only)."""
        if self.ep == 1:
            return {}
        from kiln.parallel.expert_state import ExpertCheckpoint

        return {"experts": ExpertCheckpoint(self.model, writer=dist.get_rank(self.edp_group) == 0)}

    @property
    def placement(self):
        return self.model.kiln_ep.placement if self.ep > 1 else None

    def after_resume(self, stage, step: int) -> None:
        """Migrate from the checkpoint's placement to the requested one (no-op if equal or auto)."""
        if self.ep > 1 and self.want is not None and not np.array_equal(self.want, self.placement):
            self._migrate(self.want, stage.engine, "parallel.placement")

    def eval_begin(self, stage) -> None:
        self.profiler.active = False  # profiles and routing metrics describe training batches

    def eval_end(self, stage) -> None:
        self.profiler.active = True

    def _migrate(self, placement, engine, why: str) -> None:
        from kiln.parallel.expert_state import migrate

        if self.routed_under is None:
            self.routed_under = self.placement
        info = migrate(self.model, placement, engine.optimizer)
        if dist.get_rank() == 0:
            print(f"kiln: {why}: moved {info['moved_experts']} experts to the new placement", flush=True)

    def step_end(self, stage, step: int, seconds: float) -> None:
        """Save a routing profile / re-solve the placement when their intervals come up."""
        engine, monitor = stage.engine, stage.run.monitor
        t, p = self.recipe.train, self.recipe.parallel
        if p.profile_every and step % p.profile_every == 0:
            prof = self.profiler.snapshot("profile")
            if prof is not None:
                self.last_profile = prof
                if dist.get_rank() == 0:
                    path = save_profile(prof, self.run_dir, step)
                    print(f"kiln: routing profile {path}", flush=True)
                    if monitor.wandb is not None:
                        try:
                            monitor.log_wandb(wandb_heatmaps(prof), step)
                        except Exception as e:  # building the images must not stop training either
                            print(f"kiln: W&B routing heatmaps not logged ({type(e).__name__}: {e})")
        if self.ep == 1 or p.placement != "auto":
            return
        if self.solve is not None and step % t.log_every == 0:   # a background solve: done yet?
            self._collect(engine, step, wait=False)
        if self.solve is None and step % p.placement_every == 0:
            prof = self.last_profile or self.profiler.snapshot("profile", reset=False)
            if prof is not None:
                self.solve = _Solve(self, prof, step) if dist.get_rank() == 0 else True
                if not p.placement_async:
                    self._collect(engine, step, wait=True)

    def _collect(self, engine, step: int, wait: bool) -> None:
        """Rank 0 tells every rank how the solve went (collective); all migrate to its result."""
        box = [None]
        if dist.get_rank() == 0:
            box = [self.solve.outcome(wait)]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
        if outcome is None:  # still solving
            return
        self.solve = None
        kind, value, started, seconds = outcome
        why = f"auto placement at step {step} (from step {started}'s profile, solved in {seconds:.1f} s)"
        if kind == "error":
            if dist.get_rank() == 0:
                print(f"kiln: {why}: failed ({value}); keeping the current placement", flush=True)
        elif not np.array_equal(value, self.placement):
            self._migrate(value, engine, why)
        elif dist.get_rank() == 0:
            print(f"kiln: {why}: unchanged", flush=True)

    def metrics(self, stage, steps: int) -> dict:
        """Routing quality, all-to-all bytes/time per step and aux loss (collective: all ranks call).
        Quality is judged under the placement the window's tokens were routed under."""
        device = stage.run.device
        out = {}
        prof = self.profiler.snapshot("metrics")
        if prof is not None:
            routed = self.routed_under if self.routed_under is not None else self.placement
            out.update(placement_quality(prof, routed, self.ep))
            load = prof.load / np.maximum(prof.load.sum(1, keepdims=True), 1)
            out["moe/expert_load"] = np.round(load, 5).tolist()  # layers x experts: the heatmap
        self.routed_under = None
        a2a = A2A_STATS.snapshot()
        aux = sum(float(b.aux_loss.detach()) for b in self.blocks if b.aux_loss is not None)
        dropped = sum(int(b.stats.get("dropped", 0)) for b in self.blocks)
        t = torch.tensor([a2a["bytes"], a2a["seconds"], aux, dropped], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        world = dist.get_world_size()
        out.update({"moe/aux_loss": t[2].item() / world, "moe/dropped": t[3].item()})
        if self.ep > 1:
            out.update({"moe/a2a_bytes_per_step": t[0].item() / world / max(steps, 1),
                        "moe/a2a_s_per_step": t[1].item() / world / max(steps, 1)})
        return out

    def console(self, rec: dict) -> str:
        """The console suffix for a metrics record."""
        s = f" | moe aux {rec.get('moe/aux_loss', 0):.3f}"
        if "moe/balance_min" in rec:
            s += f" bal {rec['moe/balance_min']:.2f}"
        if "moe/cross_rank_frac" in rec and self.ep > 1:
            s += f" xrank {rec['moe/cross_rank_frac']:.2f}"
        if "moe/a2a_s_per_step" in rec:
            s += f" a2a {rec['moe/a2a_bytes_per_step'] / 2 ** 20:.1f}MiB {1e3 * rec['moe/a2a_s_per_step']:.0f}ms"
        return s


def ep_nodes(ep: int, env=None) -> int:
    """Nodes one expert-parallel group spans: its ep consecutive ranks over nodes of
    LOCAL_WORLD_SIZE ranks (torchrun and kiln's Slurm launch set it). 1 when the group fits in a
    node or does not split into whole nodes."""
    env = os.environ if env is None else env
    try:
        local = int(env.get("LOCAL_WORLD_SIZE") or 0)
    except ValueError:
        local = 0
    return ep // local if 0 < local < ep and ep % local == 0 else 1


class _Solve:
    """Rank 0's auto re-solve (the ILP, time-limited; stage 3 if asked) in a thread: HiGHS releases
    the GIL, so with parallel.placement_async the training loop goes on meanwhile."""

    def __init__(self, run: MoEHook, prof, step: int):
        import threading

        t = run.recipe.parallel
        self.step, self.t0, self.result = step, time.perf_counter(), None
        args = (prof, "ilp", Topology(ranks=run.ep, nodes=ep_nodes(run.ep)), cost_model(run.recipe.model, run.bf16))
        # Training sends every token home after each MoE layer: under dedup dispatch the bytes
        # follow co-selection (kiln.parallel.placement.coselect), not cross-layer traffic.
        kw = dict(time_limit=t.placement_time_limit, refine=t.placement_refine,
                  min_balance=t.placement_min_balance,
                  coselect=t.moe_dedup and prof.coselect is not None)
        out = str(run.run_dir / "placement_auto.json")
        self.thread = threading.Thread(target=self._run, args=(args, kw, out), daemon=True,
                                       name="kiln-placement")
        self.thread.start()

    def _run(self, args, kw, out) -> None:
        try:
            res = place(*args, **kw)
            res.to_json(out)
            self.result = ("ok", res.placement)
        except Exception as e:  # an unsolvable profile must not end the run
            self.result = ("error", f"{type(e).__name__}: {e}")
        self.seconds = time.perf_counter() - self.t0

    def outcome(self, wait: bool):
        """(kind, placement or message, start step, seconds), or None while still solving."""
        if wait:
            self.thread.join()
        if self.thread.is_alive():
            return None
        return (*self.result, self.step, self.seconds)


def resume_placement(run_dir, ep: int):
    """The placement the newest checkpoint was saved under (None: no checkpoint, or not expert
    parallel). Raises CheckpointError when the checkpoint's expert parallelism differs from ep."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    from kiln.parallel.expert_state import expert_files, saved_placement

    tag_dir = ckpt_root(run_dir) / tag
    try:
        placement = saved_placement(tag_dir)
    except PlacementError as e:
        raise CheckpointError(str(e)) from None
    ranks = len(expert_files(tag_dir))
    if (placement is None) != (ep == 1) or (placement is not None and ranks != ep):
        raise CheckpointError(f"checkpoint {tag_dir} was saved with parallel.ep={max(ranks, 1)} but the "
                              f"recipe says {ep}: resume with parallel.ep={max(ranks, 1)} or use --no-resume")
    return placement
