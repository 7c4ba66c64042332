"""Training-step throughput: kiln vs a minimal eager PyTorch loop vs HF transformers' Llama.

Same architecture (Llama: RMSNorm, RoPE, GQA, SwiGLU), same batch, same fp32 AdamW, one process
on CPU. kiln runs its real step: the objective module inside a DeepSpeed engine (world of 1).
Prints tokens/s, MFU against a measured GEMM peak, and the ratios. Goals: kiln/eager >= 1.0,
kiln/HF >= 1.2. Needs `pip install transformers` for the HF column (skipped with a note if absent).

Then what `train.compile: auto` (kiln.trainer.compile_policy) picks for a 150- and a 2,000-step run
of this shape, from this run's own step times and compile time (the compiled loop's first step
over its median step), and kiln's and HF's tokens/s over the whole run with the compile
amortised: tokens / (steps x s/step + compile s, if compiled). Goal: kiln / HF >= 1.3 at 2,000
steps. The compile is timed on a cold inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR), as a
run's first compile on a machine is; --warm-cache uses the usual cache instead.

    python bench/throughput.py [--steps 12] [--dim 256] [--layers 4] [--seq 256] [--batch 8]
                               [--vocab 4096] [--malloc-tuned] [--warm-cache]

--malloc-tuned reruns the script with glibc told to keep its memory (no fresh mmap per big block,
no trimming): the loops that allocate big short-lived buffers every step (HF's and eager's full
logits) stop page-faulting them in again: about half of their gap to kiln at vocab 4096, three
quarters at 32000 (docs/trainer.md).
"""
import argparse
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn


# glibc: serve every block from the heap (never a fresh mmap) and never give the heap back
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 33),
                "MALLOC_TOP_PAD_": str(1 << 28)}


def synthetic_batches(n, batch, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]
    return [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in ids]


class EagerLlama(nn.Module):
    """The obvious eager implementation: full logits, F.cross_entropy, SDPA."""

    def __init__(self, vocab, dim, layers, heads, kv_heads, ffn, theta=10000.0):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            b = nn.Module()
            b.n1, b.n2 = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
            b.q = nn.Linear(dim, dim, bias=False)
            b.k = nn.Linear(dim, kv_heads * self.hd, bias=False)
            b.v = nn.Linear(dim, kv_heads * self.hd, bias=False)
            b.o = nn.Linear(dim, dim, bias=False)
            b.w1, b.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
            b.w2 = nn.Linear(ffn, dim, bias=False)
            self.blocks.append(b)
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, vocab, bias=False)
        inv = 1.0 / theta ** (torch.arange(0, self.hd, 2).float() / self.hd)
        self.register_buffer("inv", inv, persistent=False)

    def rope(self, x, cos, sin):
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(self, ids, labels):
        b, s = ids.shape
        ang = torch.arange(s, dtype=torch.float32)[:, None] * self.inv
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        x = self.embed(ids)
        for blk in self.blocks:
            h = blk.n1(x)
            q = self.rope(blk.q(h).view(b, s, self.heads, self.hd), cos, sin).transpose(1, 2)
            k = self.rope(blk.k(h).view(b, s, self.kv, self.hd), cos, sin).transpose(1, 2)
            v = blk.v(h).view(b, s, self.kv, self.hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + blk.o(a.transpose(1, 2).reshape(b, s, -1))
            h = blk.n2(x)
            x = x + blk.w2(F.silu(blk.w1(h)) * blk.w3(h))
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def time_interleaved(step_fns: dict, batches, warmup=3, first=None) -> dict:
    """Seconds per step of each loop, median over steps; the loops take turns step by step so
    that a change in machine load hits all of them alike. `first` (a dict) gets each loop's first
    step, which for a compiled loop includes the compile."""
    for i, (x, y) in enumerate(batches[:warmup]):
        for name, fn in step_fns.items():
            t = time.perf_counter()
            fn(x, y)
            if i == 0 and first is not None:
                first[name] = time.perf_counter() - t
    times = {name: [] for name in step_fns}
    for x, y in batches[warmup:]:
        for name, fn in step_fns.items():
            t = time.perf_counter()
            fn(x, y)
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def plain_step(model, opt):
    def step(x, y):
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_kiln(cfg, batches, lr, compile_blocks=False):
    """kiln's step function: objective module in a 1-rank DeepSpeed engine (train.compile)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from kiln.trainer.config import Recipe
    from kiln.trainer.engine import build_engine
    from kiln.trainer.launch import init_distributed
    from kiln.model import Transformer
    from kiln.trainer.objectives import CausalLM

    init_distributed(torch.device("cpu"))
    recipe = Recipe()
    recipe.model, recipe.optim.lr = cfg, lr
    recipe.train.micro_batch = batches[0][0].shape[0]
    recipe.schedule.warmup_steps = 0
    torch.manual_seed(0)
    model = Transformer(cfg)
    if compile_blocks:
        model.compile_blocks()
    engine = build_engine(CausalLM(model), recipe, bf16=False)

    def step(x, y):
        loss = engine(input_ids=x, labels=y)
        engine.backward(loss)
        engine.step()
    return step


def run_hf(cfg, batches, lr, device="cpu", bf16=False):
    """HF Llama's step function, or None without transformers. On a GPU (bench/gpu_check.py):
    fp32 weights under bf16 autocast and fused AdamW, as HF's Trainer runs with bf16=True."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.kv_heads, max_position_embeddings=4096,
                     rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=torch.device(device).type == "cuda" or None)
    return plain_step(_HFLoss(model, bf16), opt)


class _HFLoss:
    """HF shifts labels itself: pass the inputs' continuation as labels of the same length."""

    def __init__(self, model, bf16=False):
        self.model, self.bf16 = model, bf16

    def __call__(self, x, y):
        # labels = inputs makes HF predict x[t+1] from x[:t+1]; identical work to kiln's x -> y
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(input_ids=x, labels=x).loss

    def parameters(self):
        return self.model.parameters()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--malloc-tuned", action="store_true",
                    help="rerun with glibc keeping its memory (MALLOC_* variables) for every loop")
    ap.add_argument("--warm-cache", action="store_true",
                    help="time the compile with inductor's usual cache (default: a fresh, cold one)")
    args = ap.parse_args()
    if args.malloc_tuned and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, **MALLOC_TUNED)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # glibc reads them at start
    if not args.warm_cache:  # inductor reads it when it compiles, so setting it here is in time
        cold = tempfile.TemporaryDirectory(prefix="kiln-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold.name
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kiln.model import ModelConfig, flops_per_token
    from kiln.trainer.monitor import measure_peak

    threads = torch.get_num_threads()
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads)
    batches = synthetic_batches(args.steps + 3, args.batch, args.seq, args.vocab)
    peak = measure_peak(torch.device("cpu"), threads)
    tokens = args.batch * args.seq
    flops = flops_per_token(cfg, args.seq) * tokens

    torch.manual_seed(0)
    eager = EagerLlama(args.vocab, args.dim, args.layers, args.heads, args.kv_heads, cfg.hidden_dim)
    opt = torch.optim.AdamW(eager.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    loops = {"eager PyTorch": plain_step(eager, opt), "HF LlamaForCausalLM": run_hf(cfg, batches, 1e-3),
             "kiln (DeepSpeed engine)": run_kiln(cfg, batches, 1e-3),
             "kiln, train.compile=true": run_kiln(cfg, batches, 1e-3, compile_blocks=True)}
    results, first = dict.fromkeys(loops), {}
    results.update(time_interleaved({k: v for k, v in loops.items() if v is not None}, batches, first=first))

    alloc = "tuned (MALLOC_*)" if "MALLOC_MMAP_THRESHOLD_" in os.environ else "glibc default"
    print(f"model dim={args.dim} layers={args.layers} heads={args.heads}/{args.kv_heads} "
          f"vocab={args.vocab}; batch {args.batch}x{args.seq}; {threads} threads; "
          f"GEMM peak {peak / 1e9:.1f} GFLOP/s; allocator {alloc}")
    print(f"{'loop':<26}{'s/step':>9}{'tokens/s':>11}{'MFU':>8}")
    for name, sec in results.items():
        if sec is None:
            print(f"{name:<26}  (transformers not installed: pip install transformers)")
            continue
        print(f"{name:<26}{sec:>9.3f}{tokens / sec:>11,.0f}{100 * flops / sec / peak:>7.1f}%")
    k = results["kiln (DeepSpeed engine)"]
    print(f"kiln / eager tokens/s: {results['eager PyTorch'] / k:.2f}x (goal >= 1.0)")
    kc = results["kiln, train.compile=true"]
    print(f"kiln compiled / eager: {results['eager PyTorch'] / kc:.2f}x")
    if results["HF LlamaForCausalLM"]:
        print(f"kiln / HF tokens/s:    {results['HF LlamaForCausalLM'] / k:.2f}x (goal >= 1.2)")
        print(f"kiln compiled / HF:    {results['HF LlamaForCausalLM'] / kc:.2f}x (goal >= 1.2)")
    compile_s = max(0.0, first["kiln, train.compile=true"] - kc)  # the hook's rule (kiln.trainer.hooks.compile)
    report_auto(tokens, k, kc, compile_s, results["HF LlamaForCausalLM"], "warm" if args.warm_cache else "cold")


def report_auto(tokens: int, eager_s: float, compiled_s: float, compile_s: float, hf_s, cache: str) -> None:
    """What train.compile=auto picks for runs of 150 and 2,000 steps of this shape, and tokens/s
    over each whole run with the compile amortised."""
    from kiln.trainer.compile_policy import decide

    print(f"train.compile=auto from this run's times: eager {eager_s:.3f} s/step, compiled {compiled_s:.3f} "
          f"s/step, compile {compile_s:.1f} s ({cache} inductor cache)")
    print(f"{'steps':>6}  {'auto picks':<11}{'kiln eager':>11}{'kiln compiled':>14}{'kiln auto':>11}"
          f"{'HF':>9}{'auto / HF':>11}   tokens/s over the run")
    for steps in (150, 2000):
        on, why = decide(steps, eager_s, eager_s - compiled_s, compile_s)
        eager_tps = tokens / eager_s
        compiled_tps = tokens * steps / (steps * compiled_s + compile_s)
        auto_tps = compiled_tps if on else eager_tps
        hf = f"{tokens / hf_s:>9,.0f}{auto_tps * hf_s / tokens:>10.2f}x" if hf_s else f"{'-':>9}{'-':>11}"
        print(f"{steps:>6,}  {'compile' if on else 'eager':<11}{eager_tps:>11,.0f}{compiled_tps:>14,.0f}"
              f"{auto_tps:>11,.0f}{hf}   ({why})")
        if steps == 2000 and hf_s:
            print(f"kiln auto / HF at 2,000 steps, compile amortised: {auto_tps * hf_s / tokens:.2f}x (goal >= 1.3)")


if __name__ == "__main__":
    main()
