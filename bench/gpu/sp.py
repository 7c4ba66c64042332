"""Part 4: TokenRing's local block compute on one GPU, against SDPA over the same tokens.

A rank's own Q x own K/V in TokenRing is three blocks (ring_common.local_blocks: the late chunk
over the early one, full; both diagonal chunks, causal), each a Triton flash-attention call
returning (out, lse), merged in fp32 by ring_common.merge_partial; the backward runs the block
kernels with the merged (global) lse and delta, as the ring does. SDPA computes the same causal
attention over the shard in one call. Reported: ms forward and forward + backward, TFLOP/s
(causal FLOPs), and the rel. difference of output and gradients between the two.
"""
import torch
import torch.nn.functional as F

from gpu.common import free, median_ms, rel_err, within

HEADS = (32, 8, 128)  # query heads, kv heads, head dim (Llama-3-8B's)
GPU_LENS = (16384, 32768, 65536)
DRY_LENS = (32, 64)
DRY_HEADS = (2, 1, 16)
TOL = 2e-2  # two bf16 computations, each within 1e-2 of the exact result


def local_block_fwd(q, k, v, scale):
    """(out fp32, lse) of causal attention over the shard, as TokenRing's local blocks compute it."""
    from kiln.kernels import flash_attention
    from kiln.parallel.ring_common import empty_accumulators, local_blocks, merge_partial
    out, lse = empty_accumulators(q)
    first, last = local_blocks(q.shape[1], causal=True)
    for ql, qh, kl, kh, diag in first + last:
        o, l_ = flash_attention.attention_fwd(q[:, ql:qh], k[:, kl:kh], v[:, kl:kh], causal=diag, scale=scale)
        merge_partial(out, lse, ql, qh, o, l_)
    return out, lse


def local_block_bwd(dout, q, k, v, out, lse, scale):
    """(dq, dk, dv) fp32 from the block kernels with the merged lse and delta."""
    from kiln.kernels import flash_attention
    from kiln.parallel.ring_common import local_blocks
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    first, last = local_blocks(q.shape[1], causal=True)
    for ql, qh, kl, kh, diag in first + last:
        a, b, c = flash_attention.attention_bwd(dout[:, ql:qh], q[:, ql:qh], k[:, kl:kh], v[:, kl:kh], None,
                                                lse[:, :, ql:qh], causal=diag, scale=scale,
                                                delta=delta[:, :, ql:qh].contiguous())
        dq[:, ql:qh] += a
        dk[:, kl:kh] += b
        dv[:, kl:kh] += c
    return dq, dk, dv


def sdpa(q, k, v):
    gqa = q.shape[2] != k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=gqa)
    return out.transpose(1, 2)


def one_length(s, dev, dtype, heads, reps):
    """Times and differences at `s` tokens (one warm-up call each, `reps` timed)."""
    hq, hkv, d = heads
    scale = d ** -0.5
    torch.manual_seed(s)
    q, k, v, dout = (torch.randn(1, s, h, d, device=dev, dtype=dtype) for h in (hq, hkv, hkv, hq))
    ring = {}

    def ring_fwd():
        ring["out"], ring["lse"] = local_block_fwd(q, k, v, scale)

    def ring_fwd_bwd():
        ring_fwd()
        ring["grads"] = local_block_bwd(dout, q, k, v, ring["out"].to(dtype), ring["lse"], scale)

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    ref = {}

    def sdpa_fwd():
        with torch.no_grad():
            ref["out"] = sdpa(qs, ks, vs)

    def sdpa_fwd_bwd():
        o = sdpa(qs, ks, vs)
        ref["out"] = o.detach()
        ref["grads"] = torch.autograd.grad(o, (qs, ks, vs), dout)

    row = {"tokens": s, "heads": f"{hq}/{hkv}x{d}", "dtype": str(dtype).split(".")[-1]}
    row["ring_fwd_ms"] = median_ms(ring_fwd, dev, warmup=1, reps=reps)
    row["ring_fwd_bwd_ms"] = median_ms(ring_fwd_bwd, dev, warmup=1, reps=reps)
    row["sdpa_fwd_ms"] = median_ms(sdpa_fwd, dev, warmup=1, reps=reps)
    row["sdpa_fwd_bwd_ms"] = median_ms(sdpa_fwd_bwd, dev, warmup=1, reps=reps)
    fwd_flops = 2 * 2 * hq * d * s * (s + 1) / 2  # QK^T and PV over the causal pairs
    for impl in ("ring", "sdpa"):
        row[f"{impl}_fwd_tflops"] = fwd_flops / row[f"{impl}_fwd_ms"] / 1e9
        row[f"{impl}_fwd_bwd_tflops"] = 3.5 * fwd_flops / row[f"{impl}_fwd_bwd_ms"] / 1e9
    row["diff"] = {"out": rel_err(ring["out"], ref["out"]),
                   **{f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", ring["grads"], ref["grads"])}}
    row["tol"] = TOL
    row["ok"] = all(within(e, TOL) for e in row["diff"].values())
    row["sdpa_over_ring_fwd_bwd"] = row["sdpa_fwd_bwd_ms"] / row["ring_fwd_bwd_ms"]
    return row


def run(report, budget, dev, dry: bool, need_s: float) -> None:
    """Part 4 into report['sp']."""
    report.part("sp")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type != "cuda":
        report.note("sp", "dry run: fp32 (the interpreter's bf16 dots are not emulated), tiny lengths")
    skipped = []
    lens = DRY_LENS if dry else GPU_LENS
    for s in lens:
        if not budget.allows(need_s * (s / lens[0]) ** 2):  # attention's cost grows as s^2
            skipped.append(str(s))
            continue
        try:
            row = one_length(s, dev, dtype, DRY_HEADS if dry else HEADS, 1 if dry else 5)
        except Exception as e:
            row = {"tokens": s, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        report.add("sp", row)
        print(f"  {s:>6} tokens: local blocks {row.get('ring_fwd_bwd_ms', float('nan')):.2f} ms fwd+bwd, SDPA "
              f"{row.get('sdpa_fwd_bwd_ms', float('nan')):.2f} ms; diff {row.get('diff')} "
              f"{'ok' if row['ok'] else 'FAIL'} {row.get('error', '')}", flush=True)
        free(dev)
    report.finish("sp", "partial" if skipped else "ran",
                  f"skipped for the time budget: {', '.join(skipped)} tokens" if skipped else "")
