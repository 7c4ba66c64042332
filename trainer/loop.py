"""One rank's training run: build everything, step, evaluate, checkpoint, report."""
import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kiln import kernels
from kiln.data.loader import ChunkLoader
from kiln.data.prepare import Prepared
from kiln.parallel.mesh import build_mesh
from kiln.parallel.sequence import apply_sequence_parallel, comm_metrics, shard_batch
from kiln.trainer import checkpoint
from kiln.trainer.config import check_vocab, to_dict
from kiln.trainer.decompose_run import DecomposeRun
from kiln.trainer.engine import build_engine
from kiln.trainer.launch import init_distributed, pick_device
from kiln.model import Transformer, count_params, flops_per_token
from kiln.trainer.moe_run import MoERun, expert_checkpoint, resume_placement
from kiln.trainer.monitor import Monitor, fmt_eta, memory_gb, peak_flops
from kiln.trainer.objectives import build_objective


def resolve_model(recipe, vocab: int):
    """The model config with vocab_size filled in from the tokenizer when it is 0."""
    m = recipe.model
    check_vocab(m.vocab_size, vocab)
    if m.vocab_size == 0:
        m = dataclasses.replace(m, vocab_size=-(-vocab // 64) * 64)
    return m


def _mean_across_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train(recipe, run_dir: Path, data_dir: Path, resume: bool = True) -> None:
    """Train `recipe` in this process as one rank of the already-launched world."""
    device = pick_device(recipe)
    init_distributed(device, recipe.train.dist_timeout_s)
    mesh = build_mesh(recipe.parallel.sp, recipe.parallel.ep)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    threads = recipe.train.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    kernels.configure(recipe.kernels)
    bf16 = recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and device.type == "cuda")

    data = Prepared.load(data_dir)
    model_cfg = resolve_model(recipe, data.vocab_size)
    torch.manual_seed(recipe.train.seed)
    # with expert parallelism each rank builds only the experts it keeps
    model = Transformer(model_cfg, expert_device="meta" if recipe.parallel.ep > 1 else None)
    sp_group = None
    if mesh.sp > 1:
        sp_group = mesh.sp_group
        apply_sequence_parallel(model, sp_group, recipe.parallel.sp_impl)
    saved = resume_placement(run_dir, recipe.parallel.ep) if resume else None
    moe = MoERun.setup(recipe, model, mesh, run_dir, bf16, saved)
    vsl = DecomposeRun.setup(recipe, model, model_cfg, mesh, data_dir)  # data.packing=decompose
    if recipe.train.compile:
        model.compile_blocks()
    objective = build_objective(recipe.objective.name, model, recipe.objective,
                                vsl.loss_group if vsl else sp_group).to(device)
    engine = build_engine(objective, recipe, bf16)

    t = recipe.train
    seq = recipe.data.seq_len
    loader = ChunkLoader(data.train_prefix, seq, t.micro_batch, mesh.dp_rank, mesh.dp, t.seed, t.grad_accum)
    held_out = ChunkLoader(data.valid_prefix, seq, t.micro_batch, mesh.dp_rank, mesh.dp, t.seed)
    recipe_dict = to_dict(recipe)
    experts = expert_checkpoint(model, mesh)
    state = checkpoint.load(engine, run_dir, experts) if resume else None
    if moe is not None:
        moe.after_resume(engine)
    start, tokens = (state["step"], state["tokens"]) if state else (0, 0)

    rank0 = dist.get_rank() == 0
    monitor = Monitor(run_dir, recipe, recipe_dict, t.steps, enabled=rank0, resume_step=start)
    tokens_per_step = vsl.tokens_per_step if vsl else t.micro_batch * t.grad_accum * mesh.dp * seq
    flops_tok = flops_per_token(model_cfg, seq)
    peak = peak_flops(device, threads, recipe.data.cache_dir) * dist.get_world_size()
    if rank0:
        print(f"kiln: {count_params(model) / 1e6:.2f}M params, {dist.get_world_size()} ranks "
              f"({device.type}, {'bf16' if bf16 else 'fp32'}, ZeRO {recipe.parallel.zero_stage}), "
              f"{tokens_per_step:,} tokens/step, steps {start}->{t.steps}", flush=True)

    def to_dev(batch):
        if vsl is not None:  # sequence parallelism by length (parallel.sp_min_len)
            return vsl.to_dev(batch, device)
        if sp_group is not None:  # every rank of a sequence group loaded the same rows
            batch = shard_batch(batch, sp_group)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def run_eval(step):
        batches = (to_dev(b) for b in held_out.eval_batches(t.eval_batches))
        engine.eval()
        if moe is not None:
            moe.profiler.active = False  # profiles and routing metrics describe training batches
        with torch.no_grad():
            losses = [float(engine(**b)) for b in batches]
        engine.train()
        if moe is not None:
            moe.profiler.active = True
        loss = _mean_across_ranks(sum(losses) / max(len(losses), 1), device)
        comm_metrics(1)  # evaluation traffic is not training traffic
        monitor.log({"step": step, "eval/loss": loss, "eval/ppl": float(torch.tensor(loss).exp())},
                    f"step {step:>6} | eval loss {loss:.4f} | ppl {float(torch.tensor(loss).exp()):.2f}")

    window = {"t": time.perf_counter(), "data": 0.0, "fb": 0.0, "opt": 0.0, "loss": 0.0, "n": 0}
    run_start, done_in_run = time.perf_counter(), 0
    for step in range(start, t.steps):
        step_t0 = time.perf_counter()
        for micro in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = to_dev(vsl.batch(step, micro) if vsl else loader.batch(step, micro))
            t1 = time.perf_counter()
            loss = engine(**batch)
            engine.backward(loss)
            t2 = time.perf_counter()
            if micro == t.grad_accum - 1 and ((step + 1) % t.log_every == 0 or step + 1 == t.steps):
                window["grad_norm"] = _grad_norm(engine, mesh.ep_group)
            engine.step()
            t3 = time.perf_counter()
            window["data"] += t1 - t0
            window["fb"] += t2 - t1
            window["opt"] += t3 - t2
            window["loss"] += loss.item() / t.grad_accum
        window["n"] += 1
        if vsl is not None:
            vsl.step_done(step, step + 1, time.perf_counter() - step_t0, monitor)
        tokens += tokens_per_step
        done = step + 1
        done_in_run += 1
        if done % t.log_every == 0 or done == t.steps:
            _log_train(monitor, engine, window, done, tokens, tokens_per_step,
                       vsl.flops_per_token() if vsl else flops_tok, peak, device,
                       (time.perf_counter() - run_start) / done_in_run * (t.steps - done), mesh.sp > 1, moe)
            if vsl is not None:
                monitor.log({"step": done, **vsl.window_metrics()})
            window = {"t": time.perf_counter(), "data": 0.0, "fb": 0.0, "opt": 0.0, "loss": 0.0, "n": 0}
        if moe is not None:
            moe.on_step_end(done, engine, monitor)
        if (recipe.train.eval_every and done % recipe.train.eval_every == 0) or done == t.steps:
            run_eval(done)
        if (recipe.checkpoint.every and done % recipe.checkpoint.every == 0) or done == t.steps:
            path = checkpoint.save(engine, run_dir, done, {"step": done, "tokens": tokens}, recipe_dict,
                                   recipe.checkpoint.keep, experts)
            if rank0:
                print(f"kiln: checkpoint {path}", flush=True)
    monitor.close()
    dist.barrier()


def _grad_norm(engine, ep_group=None) -> float | None:
    """Global L2 norm of the (already averaged) gradients, before clipping; None under ZeRO-2/3
    where the gradients are partitioned and the ZeRO optimizer reports the norm itself.
    Sharded expert gradients (expert parallelism) are summed over the expert group."""
    if engine.zero_optimization_stage() >= 2:
        return None
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return None
    sq = [torch.zeros((), dtype=torch.float64, device=params[0].device) for _ in range(2)]
    for p in params:
        sq[bool(getattr(p, "kiln_expert", False))] += p.grad.double().square().sum()
    if ep_group is not None:
        dist.all_reduce(sq[1], group=ep_group)
    return float((sq[0] + sq[1]).sqrt())


def _log_train(monitor, engine, w, step, tokens, tokens_per_step, flops_tok, peak, device, eta, sp,
               moe=None):
    """Average the window over ranks and write one metrics record."""
    loss = _mean_across_ranks(w["loss"] / w["n"], device)
    elapsed = time.perf_counter() - w["t"]
    tok_s = tokens_per_step * w["n"] / elapsed
    gnorm = engine.get_global_grad_norm()  # ZeRO optimizers record it; stage 0 does not
    gnorm = w.get("grad_norm") if gnorm is None else gnorm
    gnorm = float("nan") if gnorm is None else float(gnorm)
    lr = engine.get_lr()[0]
    total = max(w["data"] + w["fb"] + w["opt"], 1e-9)
    rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": tokens,
           "tokens_per_s": tok_s, "mfu": flops_tok * tok_s / peak, "mem_gb": memory_gb(device),
           "time/step_s": elapsed / w["n"], "time/data_s": w["data"] / w["n"],
           "time/fwd_bwd_s": w["fb"] / w["n"], "time/optim_s": w["opt"] / w["n"]}
    if sp:
        rec.update(comm_metrics(w["n"]))
    if moe is not None:
        rec.update(moe.metrics(w["n"], device))
    line = (f"step {step:>6}/{monitor.total} | loss {loss:.4f} | lr {lr:.2e} | gnorm {gnorm:.2f} | "
            f"{tok_s:,.0f} tok/s | MFU {100 * rec['mfu']:.1f}% | data/fb/opt "
            f"{100 * w['data'] / total:.0f}/{100 * w['fb'] / total:.0f}/{100 * w['opt'] / total:.0f}% | "
            f"mem {rec['mem_gb']:.2f}G | ETA {fmt_eta(eta)}")
    monitor.log(rec, line + (moe.line(rec) if moe is not None else ""))
