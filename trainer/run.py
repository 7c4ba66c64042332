"""A training run in one rank: the process-long `Run`, the stages it trains, and `train()`.

    Run.start  device, torch.distributed, process groups, threads, kernels, prepared data
      for each stage (trainer/stages.py: one, or with growth the small and the grown model;
      stages the newest checkpoint is past are skipped, and a stage after the small one
      starts from its grown weights, trainer/growth.py):
        Stage.build    model -> parallelize -> objective -> engine -> hooks
        Stage.resume   the newest checkpoint, if any: the step to start from
        train_stage    the loop (kiln.trainer.loop)
        Stage.teardown
    Run.close   metrics file and W&B

The run's metrics file and W&B run (the Monitor) live as long as the Run, across stages.
"""
import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from kiln import kernels
from kiln.data.prepare import Prepared
from kiln.model import count_params
from kiln.parallel.mesh import Mesh, build_mesh
from kiln.trainer import checkpoint
from kiln.trainer.batches import derive_grad_accum
from kiln.trainer.config import to_dict
from kiln.trainer.growth import start_weights
from kiln.trainer.launch import init_distributed, pick_device
from kiln.trainer.loop import train_stage
from kiln.trainer.monitor import Monitor, peak
from kiln.trainer.stage import Stage
from kiln.trainer.stages import stage_specs


@dataclasses.dataclass
class Run:
    """What lives for the whole process: device, groups, data, run directory, monitor."""

    recipe: object
    run_dir: Path
    device: torch.device
    mesh: Mesh
    data: Prepared
    threads: int
    bf16: bool
    resume: bool
    peak_flops: float = 0.0  # of one rank, in the precision in use, for MFU
    monitor: Monitor | None = None

    @classmethod
    def start(cls, recipe, run_dir: Path, data_dir: Path, resume: bool = True) -> "Run":
        """Join the launched world and set this process up (collective)."""
        device = pick_device(recipe)
        init_distributed(device, recipe.train.dist_timeout_s)
        mesh = build_mesh(recipe.parallel.sp, recipe.parallel.ep)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        threads = recipe.train.threads or max(1, (os.cpu_count() or 1) // local_world)
        torch.set_num_threads(threads)
        kernels.configure(recipe.kernels)
        accum = derive_grad_accum(recipe, dist.get_world_size())
        if accum is not None:
            recipe.train.grad_accum = accum
            if dist.get_rank() == 0:
                print(f"kiln: train.grad_accum={accum} (the global batch over micro_batch "
                      f"{recipe.train.micro_batch} x {dist.get_world_size() // recipe.parallel.sp} data-parallel ranks)",
                      flush=True)
        p = recipe.train.precision
        bf16 = p == "bf16" or (p == "auto" and device.type == "cuda")
        return cls(recipe=recipe, run_dir=Path(run_dir), device=device, mesh=mesh, data=Prepared.load(data_dir),
                   threads=threads, bf16=bf16, resume=resume)

    @property
    def rank0(self) -> bool:
        return dist.get_rank() == 0

    def resume_point(self) -> tuple[int, int]:
        """(stage, step) of the newest checkpoint; (0, 0) on a fresh start."""
        state = checkpoint.saved_state(self.run_dir) if self.resume else None
        progress = (state or {}).get("progress", {})
        return int(progress.get("stage", 0)), int(progress.get("step", 0))

    def open_monitor(self, start_step: int) -> None:
        """The metrics file and W&B run, continued from `start_step` on resume (rank 0 writes)."""
        if self.monitor is None:
            dtype = "bf16" if self.bf16 else "fp32"
            self.peak_flops, source = peak(self.device, self.threads, self.recipe.data.cache_dir, dtype)
            if self.rank0:
                print(f"kiln: MFU is measured against {self.peak_flops / 1e12:.3g} TFLOP/s per rank ({source})",
                      flush=True)
            saved = (checkpoint.saved_state(self.run_dir) or {}) if self.resume and start_step else {}
            self.monitor = Monitor(self.run_dir, self.recipe, to_dict(self.recipe), self.recipe.train.steps,
                                   enabled=self.rank0, resume_step=start_step,
                                   checkpoint_state=saved.get("monitor", {}).get("wandb"))

    def announce(self, stage: Stage, start: int) -> None:
        """One line: the model, the world and the steps ahead."""
        if self.rank0:
            print(f"kiln: {count_params(stage.model) / 1e6:.2f}M params, {dist.get_world_size()} ranks "
                  f"({self.device.type}, {'bf16' if self.bf16 else 'fp32'}, ZeRO {self.recipe.parallel.zero_stage}), "
                  f"{stage.batches.tokens_per_step:,} tokens/step, steps {start}->{stage.end}"
                  + (f" (stage {stage.index + 1} of 2: {'small' if stage.index == 0 else 'grown'} model)"
                     if self.recipe.growth.op != "none" else ""), flush=True)
            epochs = (stage.end - start) * stage.batches.tokens_per_step / max(self.data.train_tokens, 1)
            if epochs > 1.5:  # a small corpus read many times over: held-out loss then says more
                print(f"kiln: note: these steps read the {self.data.train_tokens:,}-token training split "
                      f"{epochs:.1f} times over; a larger corpus (data.source) avoids repeating it", flush=True)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        dist.barrier()


def train(recipe, run_dir: Path, data_dir: Path, resume: bool = True) -> bool:
    """Train `recipe` in this process as one rank of the already-launched world; False when a
    hook stopped the run early (a signal: kiln.trainer.hooks.stop), after a checkpoint."""
    run = Run.start(recipe, run_dir, data_dir, resume)
    specs = stage_specs(recipe, run.mesh.world)
    run.open_monitor(run.resume_point()[1])
    finished = True
    for spec in specs:
        index, step = run.resume_point()  # the newest checkpoint, written by an earlier stage too
        if index > spec.index or (index == spec.index and step >= spec.end and spec is not specs[-1]):
            continue  # this stage is done
        stage = Stage(run, spec).build(start_weights(run, specs, spec))
        start = stage.resume()
        run.announce(stage, start)
        finished = train_stage(stage, stage.batches, stage.hooks, start, stage.end)
        stage.teardown()
        if not finished:
            break
    run.close()
    return finished
