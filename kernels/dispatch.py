"""The single dispatch point: every fused op is looked up here, never chosen inside a layer.

Each op registers a torch reference and, optionally, a Triton implementation. `use` picks
between them globally (`kernels.use` in the recipe); `auto` means Triton for CUDA tensors.
"""
import os

_IMPLS: dict[str, dict[str, object]] = {}
_STATE = {"use": "auto", "ce_chunk_tokens": 0}


def register(name: str, backend: str, fn) -> None:
    """Register `fn` as the `backend` ("torch" or "triton") implementation of op `name`."""
    _IMPLS.setdefault(name, {})[backend] = fn


def configure(use: str = "auto", ce_chunk_tokens: int | None = None) -> None:
    """Set the global backend choice (from KernelsConfig)."""
    if use not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels.use must be auto, triton or torch (got {use!r})")
    _STATE["use"] = use
    if ce_chunk_tokens is not None:
        _STATE["ce_chunk_tokens"] = int(ce_chunk_tokens)


def setting(key: str):
    """Read a global kernel setting (e.g. ce_chunk_tokens)."""
    return _STATE[key]


def triton_usable(device) -> bool:
    """Triton runs on CUDA tensors, or anywhere under the interpreter (TRITON_INTERPRET=1)."""
    if getattr(device, "type", str(device)) == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_for(name: str, device) -> str:
    """The backend op `name` will use for tensors on `device`."""
    use = _STATE["use"]
    has_triton = "triton" in _IMPLS.get(name, {})
    if use == "torch" or not has_triton:
        return "torch"
    if use == "triton":
        return "triton"
    return "triton" if getattr(device, "type", str(device)) == "cuda" else "torch"


def get(name: str, device):
    """The implementation of op `name` for tensors on `device`."""
    return _IMPLS[name][backend_for(name, device)]
