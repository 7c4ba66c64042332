"""The short table printed last: one line per measured figure, then the issue's goals."""


def _f(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def table(data: dict) -> str:
    """The summary of a report's data (see common.Report)."""
    m = data["meta"]
    lines = [f"== gpu_check {m.get('date')} | {m.get('device')} | torch {m.get('torch')} triton {m.get('triton')} "
             f"| commit {m.get('commit', '?')[:10]} | {m.get('elapsed_s', 0):.0f} s of {m.get('budget_s')} s"
             + (" | DRY RUN (CPU)" if m.get("dry_run") else "")]
    inst = data.get("install", {})
    lines.append(f"install: {len(inst.get('installed', []))} wheels installed, {len(inst.get('kept', []))} kept; "
                 f"imports {', '.join(k for k, v in inst.get('imports', {}).items() if v != 'ok') or 'all'}"
                 f"{' failed' if any(v != 'ok' for v in inst.get('imports', {}).values()) else ' ok'}")
    for name in ("kernels", "speed", "train", "sp"):
        part = data.get(name)
        if part is None:
            lines.append(f"{name}: not run")
            continue
        secs = f", {part['seconds']:.0f} s" if "seconds" in part else ""
        lines.append(f"{name}: {part['status']}{secs}{' (' + part['reason'] + ')' if part.get('reason') else ''}")
        lines += [f"  {row}" for row in _rows(name, part["cases"])]
    lines.append("goals:")
    lines += [f"  {g}" for g in goals(data)]
    return "\n".join(lines)


def _rows(name, cases):
    if name == "kernels":
        for c in cases:
            yield (f"{c['case']:<22} {c['dtype']:<5} max err {_f(c.get('max_err'), '.1e')} tol {c.get('tol', '-')} "
                   f"torch {_f(c.get('torch_err'), '.1e')} {'ok' if c.get('ok') else 'FAIL ' + c.get('error', '')}")
    elif name == "speed":
        for c in cases:
            if "error" in c:
                yield f"{c['op']:<22} {c['impl']:<14} error {c['error'][:80]}"
            else:
                yield (f"{c['op']:<22} {c['impl']:<14} {_f(c['ms'], '8.3f')} ms  peak {_f(c['peak_mib'], '8.0f')} MiB  "
                       f"{_f(c.get('x_vs_kiln'), '.2f')}x kiln")
    elif name == "train":
        for c in cases:
            if c.get("run") == "hf_llama":
                yield (f"hf_llama     {_f(c.get('tokens_per_s'), ',.0f')} tok/s mem {_f(c.get('mem_gb'), '.2f')} GB; "
                       f"kiln/HF {_f(c.get('kiln_over_hf'), '.2f')}x {c.get('skipped', c.get('error', ''))}")
            elif c.get("note") or c.get("error"):
                yield f"{c['run']:<12} {'ok' if c.get('ok') else 'FAIL'}: {c.get('note') or c.get('error')}"
            else:
                yield (f"{c['run']:<12} rc {c['rc']} {c.get('steps')} steps {_f(c.get('tokens_per_s'), ',.0f')} tok/s "
                       f"MFU {_f(100 * c['mfu_measured_peak'] if c.get('mfu_measured_peak') else None, '.1f')}% "
                       f"mem {_f(c.get('mem_gb'), '.2f')} GB loss {_f(c.get('loss_first'), '.3f')} -> "
                       f"{_f(c.get('loss_last'), '.3f')} {'ok' if c.get('ok') else 'FAIL'}")
    else:
        for c in cases:
            yield (f"{c['tokens']:>6} tokens: local blocks {_f(c.get('ring_fwd_bwd_ms'), '.2f')} ms "
                   f"({_f(c.get('ring_fwd_bwd_tflops'), '.0f')} TFLOP/s) vs SDPA {_f(c.get('sdpa_fwd_bwd_ms'), '.2f')} ms "
                   f"fwd+bwd; max diff {_f(max(c['diff'].values()) if c.get('diff') else None, '.1e')} "
                   f"{'ok' if c.get('ok') else 'FAIL ' + c.get('error', '')}")


def goals(data: dict) -> list:
    """The issue's goals, each met / NOT met / unmeasured, from the figures above."""
    out = []
    k = data.get("kernels", {}).get("cases", [])
    out.append(_goal("every kernel within its tolerance", bool(k) and all(c.get("ok") for c in k) if k else None))
    speed = data.get("speed", {}).get("cases", [])
    by = {}
    for c in speed:
        by.setdefault(c["op"], {})[c["impl"]] = c
    ce = [(op, v) for op, v in by.items() if op.startswith("linear_ce") and "triton" in v and "eager" in v]
    ratios = [v["triton"]["peak_mib"] / v["eager"]["peak_mib"] for _, v in ce
              if v["triton"].get("peak_mib") and v["eager"].get("peak_mib")]
    out.append(_goal("fused linear-CE peak <= 1/4 of eager", all(r <= 0.25 for r in ratios) if ratios else None,
                     ", ".join(f"{r:.2f}" for r in ratios)))
    comp = [(op, v["torch.compile"]["ms"] / v["triton"]["ms"]) for op, v in by.items()
            if "torch.compile" in v and "triton" in v and "ms" in v["torch.compile"] and "ms" in v["triton"]]
    out.append(_goal("kernels at least as fast as torch.compile", all(r >= 1.0 for _, r in comp) if comp else None,
                     ", ".join(f"{op} {r:.2f}x" for op, r in comp)))
    tr = {c.get("run"): c for c in data.get("train", {}).get("cases", [])}
    g = tr.get("gpt2_small", {})
    mfu = g.get("mfu_measured_peak")
    dry = data["meta"].get("dry_run")
    out.append(_goal("gpt2_small above 40% MFU", None if dry or mfu is None else mfu > 0.40,
                     f"{100 * mfu:.1f}%" if mfu else ""))
    ratio = tr.get("hf_llama", {}).get("kiln_over_hf")
    out.append(_goal("gpt2_small above HF's tokens/s", None if dry or ratio is None else ratio > 1.0,
                     f"{ratio:.2f}x" if ratio else ""))
    return out


def _goal(text, met, detail=""):
    word = "unmeasured" if met is None else ("met" if met else "NOT met")
    return f"{word:<10} {text}{' (' + detail + ')' if detail else ''}"
