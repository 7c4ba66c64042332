"""Small host-side helpers shared by the Triton kernels (block sizes, grids, the CPU guard).

Triton decides at *import* time whether `@triton.jit` compiles for a GPU or runs in the Python
interpreter (TRITON_INTERPRET=1), so on CPU the variable must be set before triton is imported.
"""
import os

import torch
import triton


class TritonUnavailableError(RuntimeError):
    """A Triton kernel was asked to run where it cannot."""


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1" and _stdlib_interpreted()


def _stdlib_interpreted() -> bool:
    # triton.language's own @jit helpers (tl.sum, tl.max, ...) were wrapped when triton was
    # imported; if that happened without TRITON_INTERPRET=1 they cannot run in the interpreter.
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language.standard as std
    return isinstance(std.sum, InterpretedFunction)


def check_device(t: torch.Tensor) -> None:
    """Raise a one-line error when a Triton kernel cannot run on t's device."""
    if t.device.type == "cuda" or interpreting():
        return
    raise TritonUnavailableError(
        f"Triton kernels need CUDA tensors (got {t.device}); on CPU set TRITON_INTERPRET=1 before "
        "triton is first imported, or set kernels.use=torch/auto")


def next_pow2(n: int, lo: int = 1) -> int:
    """Smallest power of two >= max(n, lo)."""
    return max(lo, triton.next_power_of_2(int(n)))


def row_programs(rows: int, device) -> int:
    """How many programs a row-parallel kernel launches; each loops over rows pid, pid+P, ...

    A few per SM fill a GPU while keeping per-program partial sums (e.g. the RMSNorm weight
    gradient) small; the interpreter runs programs one by one in Python, so it gets few.
    """
    device = torch.device(device)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 8 * sms))
    return max(1, min(rows, 64))


def dot_precision(dtype: torch.dtype) -> str:
    """Input precision for tl.dot: exact for fp32/fp64 tensors (tf32 would cost ~1e-3 accuracy);
    irrelevant for fp16/bf16, which multiply exactly and accumulate in fp32 anyway."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


def contiguous_last(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride in its last dim (kernels index the last dim densely)."""
    return t if t.stride(-1) == 1 else t.contiguous()
