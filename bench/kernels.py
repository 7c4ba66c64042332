"""Kernel benchmarks: time and peak memory of each fused op against its peers.

CPU part (always): fused linear + cross-entropy (the chunked torch path, kernels.use=torch)
against naive full logits + F.cross_entropy, forward + backward, each measurement in a fresh
subprocess so its peak RSS (ru_maxrss) is its own. Claim: fused peak <= 1/4 of naive.
GPU part (only with CUDA): every kernel (Triton) vs torch eager, torch.compile and liger-kernel
when installed; time per fwd+bwd, peak CUDA memory, and max |out - eager| as a smoke check.

    python bench/kernels.py                 # CPU table, then GPU table or "no CUDA"
    python bench/kernels.py --vocabs 32000  # fewer / other vocab sizes
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


# ------------------------------------------------------------------ CPU: fused linear CE
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _ce_worker(impl: str, tokens: int, hidden: int, vocab: int, chunk: int, repeats: int) -> dict:
    """One measurement in this (fresh) process: peak RSS above the inputs, best time of repeats."""
    import kiln.kernels as K
    from kiln.kernels.cross_entropy import naive_linear_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * hidden ** -0.5).requires_grad_()
    y = torch.randint(0, vocab, (tokens,))
    K.dispatch.configure("torch", chunk)

    def step():
        h.grad = w.grad = None
        loss = (naive_linear_cross_entropy(h, w, y) if impl == "naive"
                else K.linear_cross_entropy(h, w, y))
        loss.backward()
        return loss.item()

    base = _rss_mib()
    t0 = time.perf_counter()
    loss = step()
    times = [time.perf_counter() - t0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # KiB -> MiB
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak_mib": peak, "time_s": min(times), "loss": loss}


def _run_worker(impl, args, vocab) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--tokens", str(args.tokens),
           "--hidden", str(args.hidden), "--vocabs", str(vocab), "--chunk", str(args.chunk),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_linear_ce(args) -> None:
    threads = torch.get_num_threads()
    print(f"## CPU: fused linear + CE (torch chunked path, chunk={args.chunk}) vs naive logits + "
          f"F.cross_entropy\n   {args.tokens} tokens, hidden {args.hidden}, fp32, forward+backward, "
          f"best of {args.repeats}, {threads} threads; peak = max RSS above the inputs\n")
    print(f"{'vocab':>8} | {'naive MiB':>10} | {'fused MiB':>10} | {'mem ratio':>9} | "
          f"{'naive s':>8} | {'fused s':>8} | {'time ratio':>10} | {'|dloss|':>8}")
    print("-" * 90)
    for vocab in args.vocabs:
        naive = _run_worker("naive", args, vocab)
        fused = _run_worker("fused", args, vocab)
        print(f"{vocab:>8} | {naive['peak_mib']:>10.0f} | {fused['peak_mib']:>10.0f} | "
              f"{fused['peak_mib'] / naive['peak_mib']:>9.3f} | {naive['time_s']:>8.2f} | "
              f"{fused['time_s']:>8.2f} | {fused['time_s'] / naive['time_s']:>10.2f} | "
              f"{abs(naive['loss'] - fused['loss']):>8.1e}", flush=True)
    print("\nmem ratio = fused / naive peak (goal <= 0.25); time ratio = fused / naive time\n")


# ------------------------------------------------------------------ GPU: every kernel
def _gpu_cases(dtype):
    """name -> (make_inputs, {impl: fn}); fn(*inputs) returns the output to backprop."""
    import kiln.kernels as K
    from kiln.kernels import cross_entropy_triton, flash_attention, moe, moe_triton
    from kiln.kernels import reference as R, rms_norm_triton, rope_triton, swiglu_triton
    from kiln.kernels.cross_entropy import naive_linear_cross_entropy
    dev = "cuda"
    B, S, H, Hkv, D, dim, ffn, V = 4, 4096, 32, 8, 128, 4096, 14336, 128256
    pos = torch.arange(S, device=dev)[None].expand(B, S)
    cos, sin = K.rope_cos_sin(pos, D, 500000.0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

    cases = {
        "rms_norm": (lambda: [rnd(B, S, dim), torch.ones(dim, device=dev, dtype=dtype, requires_grad=True)],
                     {"triton": lambda x, w: rms_norm_triton.rms_norm_triton(x, w, 1e-5),
                      "eager": lambda x, w: R.rms_norm_ref(x, w, 1e-5)}),
        "swiglu": (lambda: [rnd(B, S, ffn), rnd(B, S, ffn)],
                   {"triton": swiglu_triton.swiglu_triton, "eager": R.swiglu_ref}),
        "rope": (lambda: [rnd(B, S, H, D)],
                 {"triton": lambda x: rope_triton.apply_rope_triton(x, cos, sin),
                  "eager": lambda x: R.rope_ref(x, cos, sin)}),
        "attention": (lambda: [rnd(B, S, H, D), rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)],
                      {"triton": lambda q, k, v: flash_attention.attention_triton(q, k, v, causal=True),
                       "eager": lambda q, k, v: R.attention_ref(q, k, v, causal=True)}),
        "linear_ce": (lambda: [rnd(B * 2048, dim), rnd(V, dim),
                               torch.randint(0, V, (B * 2048,), device=dev)],
                      {"triton": lambda h, w, y: cross_entropy_triton.linear_cross_entropy_triton(h, w, y),
                       "eager": naive_linear_cross_entropy}),
        "moe_permute+unpermute": (
            lambda: [rnd(B * 4096, dim), torch.randint(0, 8, (B * 4096, 2), device=dev),
                     torch.rand(B * 4096, 2, device=dev, requires_grad=True)],
            {"triton": lambda x, e, w: _moe(moe_triton.moe_permute_triton, moe_triton.moe_unpermute_triton, x, e, w),
             "eager": lambda x, e, w: _moe(moe.moe_permute_ref, moe.moe_unpermute_ref, x, e, w)}),
    }
    for name, (_, impls) in cases.items():
        if name != "moe_permute+unpermute":  # argsort/bincount graph-break; compile gains nothing
            impls["torch.compile"] = torch.compile(impls["eager"])
    _add_liger(cases, cos, sin)
    return cases


def _moe(permute, unpermute, x, experts, weights):
    xp, _, row_map = permute(x, experts, 8)
    return unpermute(xp * 2.0, row_map, weights)


def _add_liger(cases, cos, sin):
    """liger-kernel's peers, where installed (the GPU check's adapters: bench/gpu/speed.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu.speed import _add_liger as add, _liger
    LF = _liger()
    if LF is not None:
        add(cases, LF, cos, sin)


def _measure(fn, inputs, repeats=10):
    """(ms per fwd+bwd, peak MiB above the inputs, output) on the current CUDA device."""
    def once():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out) if out.dim() else None)
        return out
    out = once()  # warm-up / compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    once()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        once()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, peak, out.detach()


def gpu_all(args) -> None:
    if not torch.cuda.is_available():
        print("## GPU: no CUDA device here -- GPU kernel benchmarks skipped (run this script on a GPU "
              "machine for Triton vs torch eager / torch.compile / liger-kernel figures)")
        return
    dtype = torch.bfloat16
    print(f"## GPU: {torch.cuda.get_device_name()} ({dtype}), fwd+bwd; ratio = impl time / triton time\n")
    print(f"{'op':>22} | {'impl':>13} | {'ms':>8} | {'peak MiB':>9} | {'ratio':>6} | {'max|out-eager|':>14}")
    print("-" * 86)
    for name, (make, impls) in _gpu_cases(dtype).items():
        if args.ops and name not in args.ops:
            continue
        torch.manual_seed(0)
        inputs = make()
        rows, ref_out = {}, None
        for impl in ["eager", "triton", "torch.compile", "liger"]:
            if impl not in impls:
                continue
            try:
                rows[impl] = _measure(impls[impl], inputs)
            except Exception as e:  # report and go on: one failing peer must not hide the rest
                print(f"{name:>22} | {impl:>13} | failed: {type(e).__name__}: {str(e)[:60]}")
                continue
            if impl == "eager":
                ref_out = rows[impl][2].float()
        t_triton = rows.get("triton", (float("nan"),))[0]
        for impl, (ms, peak, out) in rows.items():
            diff = (out.float() - ref_out).abs().max().item() if ref_out is not None else float("nan")
            print(f"{name:>22} | {impl:>13} | {ms:>8.3f} | {peak:>9.0f} | {ms / t_triton:>6.2f} | {diff:>14.2e}",
                  flush=True)
        del inputs
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocabs", type=lambda s: [int(v) for v in s.split(",")], default=[32768, 131072])
    p.add_argument("--chunk", type=int, default=2048, help="kernels.ce_chunk_tokens for the fused path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ops", type=lambda s: s.split(","), default=None, help="GPU ops to run (default all)")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_ce_worker(args.worker, args.tokens, args.hidden, args.vocabs[0],
                                    args.chunk, args.repeats)))
        return 0
    if not args.skip_cpu:
        cpu_linear_ce(args)
    gpu_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
