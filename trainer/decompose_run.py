"""The training loop's side of dataset decomposition (data.packing = decompose).

What the loop gets from `DecomposeRun`: each step's batch (one bucket, tokens_per_step /
2^k rows of 2^k tokens, see kiln.data.bucket_loader), the device transfer that turns sequence
parallelism on or off for that length (parallel.sp_min_len), the group that normalises the loss,
and per-step metrics: bucket, batch size, attention FLOPs, tokens/s per bucket.

Loss normalisation. The loss of every rank is scaled by its token share over *all* ranks
(token_share over the world group), so that DeepSpeed's average over ranks is exactly the mean
over every label of the step, whether the rows of a step were split data-parallel or sharded
along the sequence, and whatever the number of labels per rank.

Schedule. Tokens per step are constant, so tokens seen = step x tokens_per_step and the LR
schedule's progress step / train.steps equals tokens seen / total tokens: keying it to steps is
keying it to tokens (train.steps x train.tokens_per_step is the run's token budget).
"""
from kiln.data.decompose_loader import check_layout, uses_sp
from kiln.model import attention_flops, causal_pairs, flops_per_token


def tokens_per_step(recipe, world: int) -> int:
    """train.tokens_per_step, or micro_batch rows of the longest bucket per data-parallel rank."""
    t, p = recipe.train, recipe.parallel
    return t.tokens_per_step or t.micro_batch * t.grad_accum * (world // p.sp) * (1 << recipe.data.buckets[1])


def check_recipe(recipe, world: int | None = None) -> None:
    """ValueError (one line) for a recipe whose decomposition settings cannot run."""
    t, p, d = recipe.train, recipe.parallel, recipe.data
    world = world or t.nproc
    if d.packing != "decompose":
        if p.sp_min_len:
            raise ValueError("parallel.sp_min_len applies to data.packing=decompose: remove it or "
                             "set data.packing=decompose")
        if t.tokens_per_step:
            raise ValueError("train.tokens_per_step applies to data.packing=decompose; concat steps "
                             "hold micro_batch x grad_accum x ranks x data.seq_len tokens: remove it")
        return
    check_layout(tokens_per_step(recipe, world), d.buckets, world, p.sp, p.sp_min_len, t.grad_accum)


class DecomposeRun:
    """Batches, sequence-parallel switching and metrics for a decomposition run."""

    def __init__(self, recipe, model, model_cfg, mesh, data_dir):
        import torch.distributed as dist

        from kiln.data.decompose_loader import build_decompose_loader as build_bucket_loader
        from kiln.data.decompose import Decomposed, bucket_dir

        d, t, p = recipe.data, recipe.train, recipe.parallel
        check_recipe(recipe, mesh.world)
        self.tokens_per_step = tokens_per_step(recipe, mesh.world)
        dec = Decomposed.load(bucket_dir(data_dir, d.buckets, d.decompose_seed), checksum=False)
        self.loader = build_bucket_loader(d, dec, "train", self.tokens_per_step, mesh.rank, mesh.world,
                                          sp=mesh.sp, sp_min_len=p.sp_min_len, seed=t.seed,
                                          grad_accum=t.grad_accum, horizon=t.steps)
        self.sp, self.sp_min_len, self.mesh, self.model_cfg = mesh.sp, p.sp_min_len, mesh, model_cfg
        self.loss_group = dist.group.WORLD
        self.switch = None
        if mesh.sp > 1:  # after apply_sequence_parallel: wrap its ring attention in a switch
            from kiln.parallel.sequence_switch import SequenceSwitch

            self.switch = SequenceSwitch(model)
        self._window: dict[int, list[float]] = {}  # bucket -> [tokens, seconds, model FLOPs]

    @classmethod
    def setup(cls, recipe, model, model_cfg, mesh, data_dir):
        """A DecomposeRun when data.packing = decompose, else None."""
        return cls(recipe, model, model_cfg, mesh, data_dir) if recipe.data.packing == "decompose" else None

    def batch(self, step: int, micro: int) -> dict:
        """This rank's rows of (step, micro), on the CPU and not yet sharded."""
        return self.loader.batch(step, micro)

    def to_dev(self, batch: dict, device) -> dict:
        """Switch sequence parallelism for this batch's length, shard if on, move to `device`."""
        if self.switch is not None:
            on = uses_sp(batch["input_ids"].shape[1], self.sp, self.sp_min_len)
            self.switch.on = on
            if on:
                from kiln.parallel.sequence import shard_batch

                batch = shard_batch(batch, self.mesh.sp_group)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def step_done(self, step: int, done: int, seconds: float, monitor) -> None:
        """Record step `step` (now `done` steps are done), which took `seconds` on this rank."""
        plan = self.loader.plan(step)
        w = self._window.setdefault(plan.bucket, [0.0, 0.0, 0.0])
        w[0] += self.tokens_per_step
        w[1] += seconds
        w[2] += self.tokens_per_step * flops_per_token(self.model_cfg, plan.seq_len)
        monitor.log({"step": done, "vsl/bucket": plan.bucket, "vsl/seq_len": plan.seq_len,
                     "vsl/batch_size": plan.rows, "vsl/sp": plan.sp,
                     "vsl/attn_flops": attention_flops(self.model_cfg, causal_pairs(plan.rows, plan.seq_len)),
                     "vsl/step_s": seconds})

    def flops_per_token(self) -> float:
        """Model FLOPs per token over the current window (for MFU: attention cost varies by bucket)."""
        tokens = sum(w[0] for w in self._window.values())
        return sum(w[2] for w in self._window.values()) / max(tokens, 1)

    def window_metrics(self) -> dict:
        """Tokens/s of each bucket run in the window (this rank's clock x all ranks' tokens); resets."""
        out = {f"vsl/tokens_per_s_b{k}": w[0] / max(w[1], 1e-9) for k, w in sorted(self._window.items())}
        self._window = {}
        return out
