"""Part 2: the fused kernels against torch eager, torch.compile and peers, forward + backward.

Per op and implementation: the median ms of forward + backward (CUDA events, after warm-up
calls that also compile), the peak memory above the inputs, and max |out - eager| as a smoke
check. Peers where installed: liger-kernel; SDPA and FlexAttention for attention.
"""
import importlib.util

import torch

from gpu.common import free, median_ms, peak_mib

# GPU shapes, dry-run shapes
GPU = {"rows": (8, 4096), "dim": 4096, "ffn": 14336, "heads": (32, 8, 128), "ce_tokens": 8192,
       "vocabs": (32768, 128256), "moe": (16384, 64, 2), "experts": (64, 1408, 2048)}
DRY = {"rows": (1, 16), "dim": 64, "ffn": 96, "heads": (2, 1, 16), "ce_tokens": 32,
       "vocabs": (256,), "moe": (16, 6, 2), "experts": (6, 24, 32)}


def _rand(*shape, dev, dtype, scale=1.0):
    return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_()


def _liger():
    try:
        from liger_kernel.transformers import functional as LF
        return LF
    except Exception:  # absent, or built for another torch/triton
        return None


def _flex(dev):
    """flex_attention compiled, or None where this torch lacks it."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return None
    from torch.nn.attention import flex_attention as FA
    return FA


def ops(dev, dry: bool, dtype=torch.bfloat16, compile_peers: bool = True):
    """name -> (make() -> inputs, {impl: fn(*inputs) -> output to backprop})."""
    from kiln.kernels import cross_entropy as CE, eager, flash_attention, moe as M, moe_triton
    from kiln.kernels import reference as R
    from kiln.kernels import cross_entropy_triton, rms_norm_triton, rope_triton, swiglu_triton
    c = DRY if dry else GPU
    (b, s), d, f = c["rows"], c["dim"], c["ffn"]
    hq, hkv, hd = c["heads"]
    pos = torch.arange(s, device=dev)[None].expand(b, s)
    cos, sin = R.rope_cos_sin(pos, hd, 500000.0)
    doc = (torch.rand(b, s, device=dev) < 8.0 / s).cumsum(1).to(torch.int32)
    LF = _liger()

    def rnd(*shape, scale=1.0):
        return lambda: _rand(*shape, dev=dev, dtype=dtype, scale=scale)

    def moe_inputs():
        n, e, k = c["moe"]
        return [_rand(n, d, dev=dev, dtype=dtype), torch.rand(n, e, device=dev).topk(k, 1).indices,
                torch.rand(n, k, device=dev).requires_grad_()]

    def moe_run(permute, unpermute):
        def run(x, idx, w):
            xp, _, row_map = permute(x, idx, c["moe"][1])
            return unpermute(xp * 2.0, row_map, w)
        return run

    def grouped_inputs():
        e, n, k = c["experts"]
        m = c["moe"][0] * c["moe"][2]
        cuts = sorted(torch.randint(0, m, (e - 1,)).tolist())
        sizes = [hi - lo for lo, hi in zip([0, *cuts], [*cuts, m])]
        return [_rand(m, k, dev=dev, dtype=dtype), _rand(e, n, k, dev=dev, dtype=dtype, scale=k ** -0.5), sizes]

    table = {
        "rms_norm": ([rnd(b, s, d), lambda: torch.ones(d, device=dev, dtype=dtype, requires_grad=True)],
                     {"triton": lambda x, w: rms_norm_triton.rms_norm_triton(x, w, 1e-5),
                      "eager": lambda x, w: R.rms_norm_ref(x, w, 1e-5)}),
        "rope": ([rnd(b, s, hq, hd)], {"triton": lambda x: rope_triton.apply_rope_triton(x, cos, sin),
                                       "eager": lambda x: R.rope_ref(x, cos, sin)}),
        "swiglu": ([rnd(b, s, f), rnd(b, s, f)], {"triton": swiglu_triton.swiglu_triton, "eager": R.swiglu_ref}),
        "attention_causal": ([rnd(b, s, hq, hd), rnd(b, s, hkv, hd), rnd(b, s, hkv, hd)],
                             {"triton": lambda q, k, v: flash_attention.attention_triton(q, k, v, causal=True),
                              "sdpa": lambda q, k, v: eager.attention_eager(q, k, v, causal=True)}),
        "attention_doc": ([rnd(b, s, hq, hd), rnd(b, s, hkv, hd), rnd(b, s, hkv, hd)],
                          {"triton": lambda q, k, v: flash_attention.attention_triton(q, k, v, causal=True, doc_ids=doc),
                           "sdpa": lambda q, k, v: R.attention_ref(q, k, v, causal=True, doc_ids=doc)}),
        "moe_permute+unpermute": ([moe_inputs], {
            "triton": moe_run(moe_triton.moe_permute_triton, moe_triton.moe_unpermute_triton),
            "eager": moe_run(M.moe_permute_ref, M.moe_unpermute_ref)}),
        "grouped_gemm": ([grouped_inputs], {
            "grouped_mm": lambda x, w, sizes: eager.grouped_linear_eager(x, w, sizes, range(len(sizes))),
            "eager": lambda x, w, sizes: M.grouped_linear_ref(x, w, sizes, range(len(sizes)))}),
    }
    for vocab in c["vocabs"]:
        n = c["ce_tokens"]
        table[f"linear_ce_{vocab // 1000}k" if vocab >= 1000 else f"linear_ce_v{vocab}"] = (
            [rnd(n, d), rnd(vocab, d, scale=d ** -0.5), lambda v=vocab: torch.randint(0, v, (n,), device=dev)],
            {"triton": lambda h, w, y: cross_entropy_triton.linear_cross_entropy_triton(h, w, y),
             "eager": CE.naive_linear_cross_entropy})
    if compile_peers:
        for name in ("rms_norm", "rope", "swiglu", *[k for k in table if k.startswith("linear_ce")]):
            table[name][1]["torch.compile"] = torch.compile(table[name][1]["eager"])
        FA = _flex(dev)
        if FA is not None:
            _add_flex(table, FA, doc, b, s)
    if LF is not None:
        _add_liger(table, LF, cos, sin)
    return table


def _add_flex(table, FA, doc, b, s):
    flex = torch.compile(FA.flex_attention)

    def causal(bi, h, qi, ki):
        return qi >= ki

    def same_doc(bi, h, qi, ki):
        return (qi >= ki) & (doc[bi, qi] == doc[bi, ki])

    masks = {}

    def run(mask_mod, key):
        def fn(q, k, v):
            if key not in masks:
                masks[key] = FA.create_block_mask(mask_mod, b, None, s, s, device=q.device)
            out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[key],
                       enable_gqa=q.shape[2] != k.shape[2])
            return out.transpose(1, 2)
        return fn

    table["attention_causal"][1]["flex"] = run(causal, "causal")
    table["attention_doc"][1]["flex"] = run(same_doc, "doc")


def _add_liger(table, LF, cos, sin):
    table["rms_norm"][1]["liger"] = lambda x, w: LF.liger_rms_norm(x, w, 1e-5, in_place=False)
    table["swiglu"][1]["liger"] = LF.liger_swiglu
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # HF layout [B, S, D]

    def liger_rope(x):  # liger rotates q and k [B, H, S, D] together; x serves as both
        q, _ = LF.liger_rope(x.transpose(1, 2), x.transpose(1, 2), full_cos, full_sin)
        return q
    table["rope"][1]["liger"] = liger_rope
    for name in [k for k in table if k.startswith("linear_ce")]:
        table[name][1]["liger"] = lambda h, w, y: LF.liger_fused_linear_cross_entropy(h, w, y)


def measure(fn, inputs, dev, reps: int, warmup: int):
    """(ms per fwd+bwd, peak MiB above the inputs, output) for fn(*inputs)."""
    grad = {}

    def once():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        out = fn(*inputs)
        if "g" not in grad:  # one random upstream gradient, the same for every implementation
            grad["g"] = None if out.dim() == 0 else torch.randn_like(out)
        out.backward(grad["g"])
        return out
    out = once().detach()
    ms = median_ms(once, dev, warmup=warmup, reps=reps)
    return ms, peak_mib(once, dev), out


def run(report, budget, dev, dry: bool, compile_s: float) -> None:
    """Part 2 into report['speed']."""
    report.part("speed")
    if dry:
        report.note("speed", "dry run: torch.compile, FlexAttention and liger peers skipped (compile time on "
                             "CPU; liger needs CUDA); times are the interpreter's, not a GPU's")
    elif _liger() is None:
        report.note("speed", "liger-kernel not importable: no liger peer")
    # fp32 in the dry run: the interpreter has no bf16 dot
    table = ops(dev, dry, dtype=torch.float32 if dry else torch.bfloat16, compile_peers=not dry)
    reps, warmup = (1, 0) if dry else (10, 2)
    skipped = []
    for name, (makers, impls) in table.items():
        torch.manual_seed(0)
        inputs = [m() for m in makers]
        if len(inputs) == 1 and isinstance(inputs[0], list):
            inputs = inputs[0]
        rows, ref = {}, None
        for impl, fn in impls.items():
            need = compile_s if impl in ("torch.compile", "flex") else 5.0
            if not budget.allows(need):
                skipped.append(f"{name}/{impl}")
                continue
            try:
                ms, peak, out = measure(fn, inputs, dev, reps, warmup)
            except Exception as e:  # one failing peer must not hide the rest
                report.add("speed", {"op": name, "impl": impl, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(f"  {name:<22} {impl:<14} failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            if ref is None:
                ref = out.float()
            rows[impl] = {"op": name, "impl": impl, "ms": ms, "peak_mib": peak,
                          "max_abs_diff": (out.float() - ref).abs().max().item()}
        base = next((v["ms"] for k, v in rows.items() if k in ("triton", "grouped_mm")), None)
        for impl, row in rows.items():
            row["x_vs_kiln"] = row["ms"] / base if base else None  # > 1: kiln's kernel is faster
            report.add("speed", row)
            print(f"  {name:<22} {impl:<14} {row['ms']:9.3f} ms  peak {_mib(row['peak_mib'])}  "
                  f"{_x(row['x_vs_kiln'])} of kiln's time", flush=True)
        del inputs
        free(dev)
    report.finish("speed", "partial" if skipped else "ran",
                  f"skipped for the time budget: {', '.join(skipped)}" if skipped else "")


def _mib(x):
    return "-" if x is None else f"{x:,.0f} MiB"


def _x(x):
    return "-" if x is None else f"{x:.2f}x"
