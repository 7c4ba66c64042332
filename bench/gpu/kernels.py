"""Part 1: every Triton kernel against its fp64 torch reference, forward and every gradient.

Each case builds fresh random inputs (never zeros), runs the Triton path with torch.empty
poisoned (NaN), backpropagates a random upstream gradient, and compares every output and input
gradient with the fp64 reference by ||out - ref|| / ||ref||. The kiln torch path in the same
dtype is measured alongside (torch_err): the rounding a correct kernel is expected to show.
"""
import torch

from gpu.common import free, poisoned, rel_err, within

TOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (GPU shape, dry-run shape) per case
SHAPES = {
    "rms_norm": ((4, 2048, 4096), (2, 9, 96)),
    "swiglu": ((4, 2048, 11008), (2, 9, 130)),
    "rope": ((4, 2048, 32, 128), (2, 9, 3, 32)),
    "linear_ce": ((8192, 2048, 32768), (40, 48, 300)),
    "attention": ((2, 2048, 16, 4, 128), (1, 33, 4, 2, 32)),
    "moe": ((16384, 2048, 64, 2), (19, 48, 6, 2)),
    "grouped_linear": ((8192, 2048, 1408, 16), (40, 32, 24, 5)),
}


def _rand(*shape, dtype, dev, grad=True, scale=1.0):
    return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _doc_ids(b, s, dev):
    """Packed documents: random boundaries, a few per row."""
    cuts = torch.rand(b, s, device=dev) < 6.0 / s
    return cuts.cumsum(1).to(torch.int32)


def _cases(dev, dry):
    """name -> (make(dtype) -> inputs dict, triton(**inp) -> outputs, ref(**inp) -> outputs,
    torch(**inp) -> outputs or None, uses_dot)."""
    from kiln.kernels import cross_entropy as CE, eager, flash_attention, moe as M, moe_triton
    from kiln.kernels import block_attention as BA, reference as R
    from kiln.kernels import cross_entropy_triton, rms_norm_triton, rope_triton, swiglu_triton
    s = {k: v[1 if dry else 0] for k, v in SHAPES.items()}

    def rms(dt):
        *lead, d = s["rms_norm"]
        return {"x": _rand(*lead, d, dtype=dt, dev=dev), "w": _rand(d, dtype=dt, dev=dev)}

    def swi(dt):
        return {"gate": _rand(*s["swiglu"], dtype=dt, dev=dev), "up": _rand(*s["swiglu"], dtype=dt, dev=dev)}

    def rope(dt):
        b, sq, h, d = s["rope"]
        pos = torch.randint(0, 4 * sq, (b, sq), device=dev).sort(1).values
        cos, sin = R.rope_cos_sin(pos, d, 10000.0)
        # a view into a wider tensor, as the model's fused projection hands it over
        return {"base": _rand(b, sq, h + 2, d, dtype=dt, dev=dev), "h": h, "cos": cos, "sin": sin}

    def ce(dt):
        n, d, v = s["linear_ce"]
        y = torch.randint(0, v, (n,), device=dev)
        y[torch.rand(n, device=dev) < 0.05] = -100
        return {"h": _rand(n, d, dtype=dt, dev=dev), "w": _rand(v, d, dtype=dt, dev=dev, scale=d ** -0.5), "y": y}

    def attn(doc):
        def make(dt):
            b, sq, hq, hkv, d = s["attention"]
            out = {"q": _rand(b, sq, hq, d, dtype=dt, dev=dev), "k": _rand(b, sq, hkv, d, dtype=dt, dev=dev),
                   "v": _rand(b, sq, hkv, d, dtype=dt, dev=dev)}
            out["doc"] = _doc_ids(b, sq, dev) if doc else None
            return out
        return make

    def moe_x(dt):
        n, d, e, k = s["moe"]
        idx = torch.rand(n, e, device=dev).topk(k, dim=1).indices
        return {"x": _rand(n, d, dtype=dt, dev=dev), "idx": idx, "e": e}

    def moe_y(dt):
        n, d, e, k = s["moe"]
        row_map, _ = M.permute_indices(torch.rand(n, e, device=dev).topk(k, dim=1).indices, e)
        return {"y": _rand(n * k, d, dtype=dt, dev=dev), "row_map": row_map,
                "wts": torch.rand(n, k, device=dev, dtype=torch.float32).to(dt).requires_grad_()}

    def grouped(dt):
        m, kdim, n, g = s["grouped_linear"]
        cuts = sorted(torch.randint(0, m, (g - 2,)).tolist())
        sizes = [b - a for a, b in zip([0, *cuts, m], [*cuts, m])]
        sizes = sizes[:1] + [0] + sizes[1:]  # an empty group, and sizes that need padding
        return {"x": _rand(m, kdim, dtype=dt, dev=dev), "w": _rand(g, n, kdim, dtype=dt, dev=dev, scale=kdim ** -0.5),
                "sizes": sizes}

    def permute(fn):
        def run(x, idx, e):
            xp, counts, row_map = fn(x, idx, e)
            return {"x_perm": xp, "counts": counts, "row_map": row_map}
        return run

    def attn_fn(fn):
        return lambda q, k, v, doc: {"out": fn(q, k, v, causal=True, doc_ids=doc)}

    def attn_fwd(fn):
        def run(q, k, v, doc):
            o, lse = fn(q.detach(), k.detach(), v.detach(), causal=True, scale=q.shape[-1] ** -0.5, q_doc=doc, k_doc=doc)
            return {"out": o, "lse": lse}
        return run

    def rope_fn(fn):
        return lambda base, h, cos, sin: {"out": fn(base[:, :, :h], cos, sin)}

    return {
        "rms_norm": (rms, lambda x, w: {"out": rms_norm_triton.rms_norm_triton(x, w, 1e-5)},
                     lambda x, w: {"out": R.rms_norm_ref(x, w, 1e-5)},
                     lambda x, w: {"out": eager.rms_norm_eager(x, w, 1e-5)}, False),
        "swiglu": (swi, lambda gate, up: {"out": swiglu_triton.swiglu_triton(gate, up)},
                   lambda gate, up: {"out": R.swiglu_ref(gate, up)}, None, False),
        "rope": (rope, rope_fn(rope_triton.apply_rope_triton), rope_fn(R.rope_ref), rope_fn(eager.rope_eager), False),
        "linear_ce": (ce, lambda h, w, y: {"loss": cross_entropy_triton.linear_cross_entropy_triton(h, w, y, z_loss=1e-4)},
                      lambda h, w, y: {"loss": CE.naive_linear_cross_entropy(h, w, y, z_loss=1e-4)},
                      lambda h, w, y: {"loss": CE.linear_cross_entropy_ref(h, w, y, z_loss=1e-4)}, False),
        "attention_causal_gqa": (attn(False), attn_fn(flash_attention.attention_triton), attn_fn(R.attention_ref),
                                 attn_fn(eager.attention_eager), True),
        "attention_doc_mask": (attn(True), attn_fn(flash_attention.attention_triton), attn_fn(R.attention_ref),
                               attn_fn(eager.attention_eager), True),
        "attention_fwd_lse": (attn(True), attn_fwd(flash_attention.attention_fwd), attn_fwd(BA.attention_fwd), None, True),
        "moe_permute": (moe_x, permute(moe_triton.moe_permute_triton), permute(M.moe_permute_ref), None, False),
        "moe_unpermute": (moe_y, lambda y, row_map, wts: {"out": moe_triton.moe_unpermute_triton(y, row_map, wts)},
                          lambda y, row_map, wts: {"out": M.moe_unpermute_ref(y, row_map, wts)}, None, False),
        # torch's grouped_mm (not Triton): the CUDA path with its 16-byte group padding
        "grouped_linear": (grouped, lambda x, w, sizes: {"out": eager.grouped_linear_eager(x, w, sizes, range(len(sizes)))},
                           lambda x, w, sizes: {"out": M.grouped_linear_ref(x, w, sizes, range(len(sizes)))}, None, False),
    }


def _upcast(inputs: dict) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().double().requires_grad_(v.requires_grad)
        out[k] = v
    return out


def _forward_backward(fn, inputs: dict, dys=None):
    """Outputs and the gradient of every input that wants one, for upstream gradients dys
    (drawn here, fresh and random, when None)."""
    outs = fn(**inputs)
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    diff = [k for k, o in outs.items() if o.requires_grad]
    if dys is None:
        dys = {k: torch.randn(outs[k].shape, device=outs[k].device, dtype=torch.float32) for k in diff}
    grads = {}
    if diff and leaves:
        gs = torch.autograd.grad([outs[k] for k in diff], list(leaves.values()),
                                 [dys[k].to(outs[k].dtype) for k in diff], allow_unused=True)
        grads = {f"d{k}": g for k, g in zip(leaves, gs)}
    return {**outs, **grads}, dys


def _errors(got: dict, ref: dict) -> dict:
    errs = {}
    for k, r in ref.items():
        g = got.get(k)
        if g is None or r is None:
            continue
        if not r.is_floating_point():  # integer outputs (counts, row maps) must match exactly
            errs[k] = 0.0 if torch.equal(g.cpu(), r.cpu()) else 1.0
        else:
            errs[k] = rel_err(g, r)
    return errs


def check_case(name, spec, dtype_name, dev):
    """One case in one dtype: {'errors': {output: rel err}, 'torch_err': ..., 'ok': ...}."""
    make, triton_fn, ref_fn, torch_fn, _ = spec
    dt, tol = DTYPES[dtype_name], TOL[dtype_name]
    torch.manual_seed(hash((name, dtype_name)) % 2 ** 31)
    inputs = make(dt)
    with poisoned():
        got, dys = _forward_backward(triton_fn, inputs)
    ref, _ = _forward_backward(ref_fn, _upcast(inputs), {k: d.double() for k, d in dys.items()})
    errs = _errors(got, ref)
    case = {"case": name, "dtype": dtype_name, "tol": tol, "errors": errs,
            "max_err": max(errs.values()) if errs else None}
    if torch_fn is not None:
        peer, _ = _forward_backward(torch_fn, inputs, dys)
        case["torch_err"] = max(_errors(peer, ref).values())
    case["ok"] = all(within(e, tol) for e in errs.values()) and bool(errs)
    del got, ref, inputs
    free(dev)
    return case


def _e(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def run(report, budget, dev, dry: bool, interpreting: bool, per_case_s: float) -> None:
    """Part 1 into report['kernels']."""
    part = report.part("kernels")
    cases = _cases(dev, dry)
    if interpreting:
        report.note("kernels", "triton's interpreter does not emulate bf16 tl.dot (its products come out as "
                               "garbage), so the cases with dots run fp16 for bf16 here; on a GPU they run bf16")
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        report.note("kernels", f"grouped_linear fp32 takes the per-group loop; bf16 takes torch's grouped_mm "
                               f"(sm{cap[0]}{cap[1]})")
    else:
        report.note("kernels", "grouped_linear: torch's grouped_mm on CPU where it takes the operands, "
                               "no CUDA padding path here")
    skipped = 0
    for name, spec in cases.items():
        for dname in ("fp32", "bf16"):
            if interpreting and spec[4] and dname == "bf16":
                dname = "fp16"
            if not budget.allows(per_case_s):
                skipped += 1
                continue
            try:
                case = check_case(name, spec, dname, dev)
            except Exception as e:  # one broken kernel must not hide the others
                case = {"case": name, "dtype": dname, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            report.add("kernels", case)
            status = "ok" if case["ok"] else "FAIL"
            print(f"  {name:<22} {dname:<5} max err {_e(case.get('max_err'))} "
                  f"(tol {TOL[dname]:.0e}, torch path {_e(case.get('torch_err'))}) {status}"
                  + (f" {case['error']}" if "error" in case else ""), flush=True)
    report.finish("kernels", "partial" if skipped else "ran",
                  f"{skipped} cases skipped: time budget" if skipped else "")
    return part
