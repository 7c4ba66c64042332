"""Every Triton kernel compiles for a real GPU (sm_90, bf16 and fp32) -- no GPU needed.

The interpreter accepts code the compiler rejects (and the reverse), so this runs triton's
full pipeline (TTIR -> PTX -> cubin with the bundled ptxas) in a subprocess without
TRITON_INTERPRET. Signatures follow the kernels' naming: UPPER-case parameters are pointers,
except the single dimensions listed in DIMS.
"""
import os
import subprocess
import sys

import pytest

POINTER_DTYPES = {"LABELS": "*i64", "MAP": "*i64", "QD": "*i64", "KD": "*i64"}
FP32_POINTERS = {"RSTD", "LOSS", "LSE", "DELTA", "DK", "DV", "DQ", "DW_PART", "COS", "SIN"}
FLOAT_SCALARS = {"eps", "z_loss", "qk_scale", "scale"}
DIMS = {"D", "N", "S", "H", "Sq", "Sk", "Hq", "Hkv", "HALF"}
PREC_OF = {"*bf16": "tf32", "*fp32": "ieee"}  # dot_precision() of each input dtype
MODULE_DIMS = {"moe_triton": {"K"}, "cross_entropy_triton": {"V"}}  # K, V are pointers elsewhere


def _variants():
    """(module, kernel, constexprs) to compile: GPU-sized tiles as the host code picks them."""
    flash = [dict(CAUSAL=c, HAS_DOC=c, PREC=p, BLOCK_M=b, BLOCK_N=b, BLOCK_D=128)
             for c in (True, False) for p, b in (("tf32", 64), ("ieee", 32))]
    return [
        ("rms_norm_triton", "_rms_fwd", [dict(BLOCK_R=1, BLOCK_D=4096), dict(BLOCK_R=16, BLOCK_D=256)]),
        ("rms_norm_triton", "_rms_bwd", [dict(BLOCK_R=1, BLOCK_D=4096)]),
        ("swiglu_triton", "_swiglu_fwd", [dict(BLOCK=1024)]),
        ("swiglu_triton", "_swiglu_bwd", [dict(BLOCK=1024)]),
        ("rope_triton", "_rope_kernel", [dict(SIGN=1, BLOCK_R=64, BLOCK_HALF=64)]),
        ("cross_entropy_triton", "_ce_rows", [dict(WANT_GRAD=w, BLOCK_V=4096) for w in (True, False)]),
        ("moe_triton", "_scatter_rows", [dict(HAS_W=w, WANT_DOT=w, BLOCK_D=1024) for w in (True, False)]),
        ("moe_triton", "_gather_sum", [dict(HAS_W=w, BLOCK_D=1024) for w in (True, False)]),
        ("flash_attention", "_fwd", flash),
        ("flash_attention", "_bwd_dkdv", flash),
        ("flash_attention", "_bwd_dq", flash),
    ]


def _compile_all() -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", 90, 32)
    done = 0
    for mod, name, metas in _variants():
        fn = getattr(importlib.import_module(f"kiln.kernels.{mod}"), name)
        for meta in metas:
            for dt in ("*bf16", "*fp32"):
                if meta.get("PREC", PREC_OF[dt]) != PREC_OF[dt]:
                    continue  # the host picks ieee dots for fp32 inputs only
                sig = {}
                for arg in fn.arg_names:
                    if arg in meta:
                        continue
                    if arg[0].isupper() and arg not in DIMS | MODULE_DIMS.get(mod, set()):
                        sig[arg] = POINTER_DTYPES.get(arg, "*fp32" if arg in FP32_POINTERS else dt)
                    else:
                        sig[arg] = "fp32" if arg in FLOAT_SCALARS else "i32"
                triton.compile(ASTSource(fn, sig, meta), target=target)
                print(f"compiled {mod}.{name} {dt} {meta}", flush=True)
                done += 1
    print(f"done {done}")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "done 36" in proc.stdout, proc.stdout[-2000:]


if __name__ == "__main__":
    _compile_all()
