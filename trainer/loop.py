"""The training loop of one stage: the whole step on one screen.

Everything a method adds (expert placement, sequence-parallel traffic, decomposition metrics,
...) happens in the stage's hooks (kiln.trainer.hooks); the batch source, the objective and the
sequence-parallel layout hide which packing, loss and layout run. The loop only steps, logs,
evaluates and checkpoints.
"""
import time

import torch
import torch.distributed as dist

from kiln.infer.evaluate import batch_losses
from kiln.trainer.monitor import fmt_eta, window_peak_gb


def due(every: int, done: int, end: int) -> bool:
    """Whether an every-N-steps action falls on step `done` (always on the last step)."""
    return bool(every and done % every == 0) or done == end


def train_stage(stage, batches, hooks, start: int, end: int) -> bool:
    """Train `stage` from step `start` to `end` on `batches` (a kiln.data.batches.BatchSource);
    False if a hook stopped it early (after a checkpoint at that step)."""
    t, engine = stage.recipe.train, stage.engine
    window, clock = Window(), (time.perf_counter(), start)
    for step in range(start, end):
        t_step = time.perf_counter()
        logs = due(t.log_every, step + 1, end)
        for micro in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = stage.prepare(batches.batch(step, micro), step)
            t1 = time.perf_counter()
            loss = engine(**batch)
            engine.backward(loss)
            t2 = time.perf_counter()
            if logs and micro == t.grad_accum - 1:
                window.grad_norm = stage.grad_norm()
            stage.step(loss, last=micro == t.grad_accum - 1)  # the guard may skip the update
            window.micro_step(loss, t1 - t0, t2 - t1, time.perf_counter() - t2, t.grad_accum,
                              stage.objective.last_metrics)
        done = step + 1
        flops = batches.tokens_per_step * stage.objective.flops_per_token(batches.row_len(step))
        stage.progress.step, stage.progress.tokens = done, stage.progress.tokens + batches.tokens_per_step
        stage.progress.flops += flops
        window.step_done(batches.tokens_per_step, flops)
        hooks.step_end(stage, done, time.perf_counter() - t_step)
        if logs:
            eta = (time.perf_counter() - clock[0]) / (done - clock[1]) * (t.steps - done)
            log_train(stage, hooks, window, eta)
            window = Window()
        if due(t.eval_every, done, end):
            evaluate(stage, hooks, done)
        if due(stage.recipe.checkpoint.every, done, end):
            stage.save(done)
        if done < end and hooks.should_stop(stage, done):  # a hook asks to end here (a signal)
            if not due(stage.recipe.checkpoint.every, done, end):
                stage.save(done)
            return False
    return True


class Window:
    """What the steps since the last log add up to, on this rank."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps, self.loss, self.data, self.fwd_bwd, self.optim = 0, 0.0, 0.0, 0.0, 0.0
        self.tokens, self.flops, self.grad_norm = 0, 0.0, None
        self.objective: dict[str, float] = {}

    def micro_step(self, loss, data_s, fwd_bwd_s, optim_s, grad_accum: int, metrics: dict) -> None:
        self.data, self.fwd_bwd, self.optim = self.data + data_s, self.fwd_bwd + fwd_bwd_s, self.optim + optim_s
        self.loss += loss.item() / grad_accum
        for k, v in metrics.items():
            self.objective[k] = self.objective.get(k, 0.0) + float(v) / grad_accum

    def step_done(self, tokens: int, flops: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.flops += flops


def mean_across_ranks(value: float, device) -> float:
    """The mean of `value` over every rank (collective)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def log_train(stage, hooks, w: Window, eta: float) -> None:
    """Average the window over ranks and write one metrics record (collective)."""
    run, engine, n = stage.run, stage.engine, w.steps
    loss = mean_across_ranks(w.loss / n, run.device)
    elapsed = time.perf_counter() - w.t0
    tok_s = w.tokens / elapsed
    gnorm = engine.get_global_grad_norm()  # ZeRO optimizers record it; stage 0 does not
    gnorm = w.grad_norm if gnorm is None else gnorm
    gnorm = float("nan") if gnorm is None else float(gnorm)
    lr = engine.get_lr()[0]
    total = max(w.data + w.fwd_bwd + w.optim, 1e-9)
    world = dist.get_world_size()
    rec = {"step": stage.progress.step, "train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm,
           "train/tokens": stage.progress.tokens, "train/flops": stage.progress.flops,
           "perf/tokens_per_s": tok_s, "perf/tokens_per_s_per_device": tok_s / world,
           "perf/mfu_pct": 100 * w.flops / w.tokens * tok_s / (run.peak_flops * world),
           "perf/peak_tflops_per_device": run.peak_flops / 1e12, "perf/mem_peak_gb": window_peak_gb(run.device),
           "perf/step_s": elapsed / n, "perf/data_s": w.data / n, "perf/fwd_bwd_s": w.fwd_bwd / n,
           "perf/optim_s": w.optim / n}
    rec.update({f"objective/{k}": mean_across_ranks(v / n, run.device) for k, v in sorted(w.objective.items())})
    rec.update(hooks.metrics(stage, n))
    line = (f"step {rec['step']:>6}/{stage.recipe.train.steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"gnorm {gnorm:.2f} | {tok_s:,.0f} tok/s | MFU {rec['perf/mfu_pct']:.1f}% | data/fb/opt "
            f"{100 * w.data / total:.0f}/{100 * w.fwd_bwd / total:.0f}/{100 * w.optim / total:.0f}% | "
            f"mem {rec['perf/mem_peak_gb']:.2f}G | ETA {fmt_eta(eta)}")
    run.monitor.log(rec, line + hooks.console(rec))


def evaluate(stage, hooks, step: int) -> float:
    """Mean held-out loss over every rank's evaluation batches (collective); logged and returned."""
    hooks.eval_begin(stage)
    engine = stage.engine
    engine.eval()
    total, n = batch_losses(lambda b: engine(**stage.place(b)),
                            stage.held_out.eval_batches(stage.recipe.train.eval_batches))
    engine.train()
    hooks.eval_end(stage)
    loss = mean_across_ranks(total / max(n, 1), stage.run.device)
    ppl = float(torch.tensor(loss).exp())
    stage.run.monitor.log({"step": step, "train/tokens": stage.progress.tokens, "eval/loss": loss, "eval/ppl": ppl},
                          f"step {step:>6} | eval loss {loss:.4f} | ppl {ppl:.2f}")
    return loss
