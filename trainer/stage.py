"""A stage of a run: one model trained over a range of steps.

`Stage.build()` goes model -> parallelize -> objective -> engine -> hooks, `resume()` restores
the newest checkpoint into it, and `teardown()` lets it go, so that a run can hold several
stages one after another (growth ends one model and continues with a larger one).
"""
import dataclasses
import gc
import time

import torch
import torch.distributed as dist

from kiln.model import Transformer
from kiln.parallel.apply import parallelize
from kiln.trainer import checkpoint, compile_policy
from kiln.trainer.activation_checkpointing import apply_activation_checkpointing
from kiln.trainer.batches import held_out_batches, ring_for, train_batches
from kiln.trainer.config import check_vocab, to_dict
from kiln.trainer.engine import build_engine, grad_norm
from kiln.trainer.hooks import stage_hooks
from kiln.trainer.hooks.moe import start_placement
from kiln.trainer.objectives import build_objective


def resolve_model(recipe, vocab: int):
    """The model config with vocab_size filled in from the tokenizer when it is 0."""
    m = recipe.model
    check_vocab(m.vocab_size, vocab)
    if m.vocab_size == 0:
        m = dataclasses.replace(m, vocab_size=-(-vocab // 64) * 64)
    return m


@dataclasses.dataclass
class Progress:
    """Where the run is: its stage, optimizer steps done and tokens trained on (a checkpoint part)."""

    stage: int = 0
    step: int = 0
    tokens: int = 0

    flops: float = 0.0  # model FLOPs trained, all ranks (MFU's count)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "tokens": self.tokens, "flops": self.flops}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.step, self.tokens = (int(state.get(k, 0)) for k in ("stage", "step", "tokens"))
        self.flops = float(state.get("flops", 0.0))


class Stage:
    """One model of a run and everything built around it (see the module docstring)."""

    def __init__(self, run, spec):
        self.run, self.spec, self.recipe, self.index = run, spec, spec.recipe, spec.index
        self.start, self.end = spec.start, spec.end
        self.progress = Progress(stage=spec.index)
        self.grown = None  # growth.Growth: this stage starts from the previous stage's grown weights

    def build(self, grown=None) -> "Stage":
        """Build everything; `grown` (trainer.growth.Growth) gives the initial weights and placement."""
        run, recipe = self.run, self.recipe
        mesh = run.mesh
        self.grown = grown
        self.model_cfg = resolve_model(recipe, run.data.vocab_size)
        torch.manual_seed(recipe.train.seed)
        # with expert parallelism each rank builds only the experts it keeps (unless it is grown)
        experts_on_meta = recipe.parallel.ep > 1 and grown is None
        self.model = Transformer(self.model_cfg, expert_device="meta" if experts_on_meta else None)
        if grown is not None:
            self.model.load_state_dict(grown.state)
        self.batches = train_batches(recipe, run.data, mesh)
        self.held_out = held_out_batches(recipe, run.data, mesh)
        placement = grown.placement if grown is not None else \
            start_placement(recipe, self.model_cfg, run.run_dir, run.resume)
        self.layout = parallelize(self.model, mesh, recipe.parallel, ring_for=ring_for(recipe), placement=placement)
        apply_activation_checkpointing(self.model, recipe.train.activation_checkpointing)  # wraps the parallel seams
        self.compiled = compile_policy.choose(self)  # train.compile: on, off, or auto's measured decision
        if self.compiled:
            self.model.compile_blocks()
        if self.batches.global_token_mean:
            loss_group = dist.group.WORLD
        else:
            loss_group = mesh.sp_group if mesh.sp > 1 else None
        self.objective = build_objective(recipe.objective.name, self.model, recipe.objective,
                                         loss_group=loss_group, seed=recipe.train.seed,
                                         rank=mesh.rank, mask_id=run.data.mask_id).to(run.device)
        first = grown.progress.get("step", self.start) if grown is not None else self.start
        self.engine = build_engine(self.objective, recipe, run.bf16, steps=self.end - first, warmup=self.spec.warmup)
        self.recipe_dict = to_dict(run.recipe)  # a checkpoint names the run's recipe, whatever the stage
        self.hooks = stage_hooks(self)
        self.hooks.build(self)
        self.guard = next(h for h in self.hooks if h.name == "guard")
        return self

    def parts(self) -> dict:
        """What a checkpoint of this stage holds beside the engine (kiln.trainer.checkpoint)."""
        return {"progress": self.progress, "monitor": self.run.monitor, **self.hooks.parts()}

    def resume(self) -> int:
        """Restore the newest checkpoint (if any and the run resumes) or, for a grown stage, carry
        the previous stage's progress over; the first step to train."""
        if self.grown is not None:
            self.progress.load_state_dict({**self.grown.progress, "stage": self.index})
        elif self.run.resume:
            checkpoint.load(self.engine, self.run.run_dir, self.parts())
        self.hooks.after_resume(self, self.progress.step)
        return self.progress.step

    def save(self, step: int) -> None:
        """Checkpoint after `step` (collective). With checkpoint.async_save the files are written in
        the background, except the stage's last checkpoint: the next stage, growth and the final
        report read it, so that one is complete when this returns."""
        c, t0 = self.recipe.checkpoint, time.perf_counter()
        background = c.async_save and step < self.end
        path = checkpoint.save(self.engine, self.run.run_dir, step, self.parts(), self.recipe_dict, c.keep,
                               background=background, timeout_s=self.recipe.train.dist_timeout_s)
        blocked = time.perf_counter() - t0
        self.last_save_s = blocked  # sizes Slurm's signal lead (hooks/stop.py)
        if dist.get_rank() == 0:
            how = "being written in the background, training blocked" if background else "saved in"
            print(f"kiln: checkpoint {path} ({how} {blocked:.3f} s)", flush=True)

    def prepare(self, batch: dict, step: int) -> dict:
        """A training batch as the engine takes it: the objective's inputs, laid out, on the device."""
        self.objective.rank = self.rows_owner(batch)
        return self.place(self.objective.prepare_batch(batch, step))

    def rows_owner(self, batch: dict) -> int:
        """The rank that seeds the objective's draws for `batch`: the data-parallel rank where the
        sequence ranks of a replica hold the same rows (they shard them after prepare_batch, so
        they must draw the same masks), this rank where it holds rows of its own (sp = 1, or a
        decomposition bucket below parallel.sp_min_len, whose rows are split over every rank)."""
        mesh = self.run.mesh
        if mesh.sp > 1 and self.layout is not None and (
                self.layout.ring_for is None or self.layout.ring_for(batch["input_ids"].shape[1])):
            return mesh.dp_rank
        return mesh.rank

    def place(self, batch: dict) -> dict:
        """This rank's part of `batch` for its sequence-parallel layout, on the device."""
        if self.layout is not None:
            batch = self.layout(batch)
        return {k: v.to(self.run.device, non_blocking=True) for k, v in batch.items()}

    def step(self, loss, last: bool) -> None:
        """engine.step() after a micro-step's backward; at the last micro-step the guard
        (kiln.trainer.hooks.guard) skips the update when the loss or gradients are not finite."""
        self.guard.step(self, loss, last)

    def grad_norm(self) -> float | None:
        """Global gradient norm before clipping (None where ZeRO partitions the gradients)."""
        return grad_norm(self.engine, self.run.mesh.ep_group)

    def teardown(self) -> None:
        """Drop the model, engine and optimizer state (before the next stage builds its own)."""
        for name in ("engine", "objective", "model", "hooks", "layout", "guard"):
            setattr(self, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
