"""kiln.kernels: fused ops, each with a torch reference and one dispatch point (dispatch.py).

Layers call the functions below; which implementation runs is decided in dispatch.py only.
Implementations are registered lazily. Triton is imported on the first call that takes the Triton
path, so importing kiln.kernels on a CPU machine never imports triton (that matters because triton
fixes compile-vs-interpret when it is first imported). The torch ones load with kiln.model
(`load()`), so importing kiln.kernels alone imports no torch.
"""
import importlib
import importlib.util

from kiln.kernels import dispatch
from kiln.kernels.config import KernelsConfig

# Every implementation is imported on its first call, so importing kiln.kernels imports no torch:
# the `kiln` CLI reads recipes through kiln.kernels.config without paying torch's import.
_TORCH_OPS = {
    "rms_norm": ("eager", "rms_norm_eager"),
    "swiglu": ("reference", "swiglu_ref"),
    "rope": ("eager", "rope_eager"),
    "attention": ("eager", "attention_eager"),
    "attention_fwd": ("block_attention", "attention_fwd"),
    "attention_bwd": ("block_attention", "attention_bwd"),
    "linear_cross_entropy": ("cross_entropy", "linear_cross_entropy_ref"),
    "moe_permute": ("moe", "moe_permute_ref"),
    "moe_unpermute": ("moe", "moe_unpermute_ref"),
    "grouped_linear": ("eager", "grouped_linear_eager"),
}
_TRITON_OPS = {
    "rms_norm": ("rms_norm_triton", "rms_norm_triton"),
    "swiglu": ("swiglu_triton", "swiglu_triton"),
    "rope": ("rope_triton", "apply_rope_triton"),
    "attention": ("flash_attention", "attention_triton"),
    "attention_fwd": ("flash_attention", "attention_fwd"),
    "attention_bwd": ("flash_attention", "attention_bwd"),
    "linear_cross_entropy": ("cross_entropy_triton", "linear_cross_entropy_triton"),
    "moe_permute": ("moe_triton", "moe_permute_triton"),
    "moe_unpermute": ("moe_triton", "moe_unpermute_triton"),
}
# the references, also importable from here (kiln.kernels.rope_cos_sin, ...), loaded on first access
_EXPORTS = {
    "attention_fwd_ref": ("block_attention", "attention_fwd"),
    "attention_bwd_ref": ("block_attention", "attention_bwd"),
    "linear_cross_entropy_ref": ("cross_entropy", "linear_cross_entropy_ref"),
    "moe_permute_ref": ("moe", "moe_permute_ref"),
    "moe_unpermute_ref": ("moe", "moe_unpermute_ref"),
    **{name: ("eager", name) for name in ("attention_eager", "grouped_linear_eager", "rms_norm_eager",
                                          "rope_eager")},
    **{name: ("reference", name) for name in ("attention_ref", "rms_norm_ref", "rope_cos_sin", "rope_ref",
                                              "swiglu_ref")},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kiln.kernels' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(f"kiln.kernels.{module}"), attr)


def _lazy(op: str, backend: str, module: str, attr: str):
    """A stand-in for `kiln.kernels.<module>.<attr>` that imports it on its first call and puts it
    in its place in the dispatch table (so later lookups return the function itself)."""

    def call(*args, **kwargs):
        fn = getattr(importlib.import_module(f"kiln.kernels.{module}"), attr)
        dispatch.register(op, backend, fn)
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    call.__doc__ = f"{backend} implementation kiln.kernels.{module}.{attr} (imported on first call)."
    return call


def load() -> None:
    """Import the torch implementations now. kiln.model calls it on import, so a model's first
    call (which may be under torch.compile) never meets an import."""
    for op, (module, attr) in _TORCH_OPS.items():
        dispatch.register(op, "torch", getattr(importlib.import_module(f"kiln.kernels.{module}"), attr))


for _op, (_mod, _fn) in _TORCH_OPS.items():
    dispatch.register(_op, "torch", _lazy(_op, "torch", _mod, _fn))
if importlib.util.find_spec("triton") is not None:
    for _op, (_mod, _fn) in _TRITON_OPS.items():
        dispatch.register(_op, "triton", _lazy(_op, "triton", _mod, _fn))


def rms_norm(x, weight, eps: float):
    """RMSNorm of x over its last dim, times weight."""
    return dispatch.get("rms_norm", x.device)(x, weight, eps)


def swiglu(gate, up):
    """silu(gate) * up."""
    return dispatch.get("swiglu", gate.device)(gate, up)


def apply_rope(x, cos, sin):
    """Rotary position embedding of x [B, S, H, D] with tables [B, S, D/2] from rope_cos_sin."""
    return dispatch.get("rope", x.device)(x, cos, sin)


def attention(q, k, v, *, causal: bool, scale: float | None = None, doc_ids=None):
    """Softmax attention, q [B, S, Hq, D], k/v [B, S, Hkv, D], optional doc_ids [B, S] masks."""
    return dispatch.get("attention", q.device)(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)


def attention_fwd(q, k, v, *, causal: bool, scale: float, q_doc=None, k_doc=None):
    """Block attention forward for ring algorithms: (out, lse [B, Hq, Sq] fp32); see block_attention."""
    return dispatch.get("attention_fwd", q.device)(q, k, v, causal=causal, scale=scale,
                                                    q_doc=q_doc, k_doc=k_doc)


def attention_bwd(dout, q, k, v, out, lse, *, causal: bool, scale: float, q_doc=None, k_doc=None,
                  delta=None):
    """Block attention backward (dq, dk, dv) in fp32; lse/delta may be the global ones."""
    return dispatch.get("attention_bwd", q.device)(dout, q, k, v, out, lse, causal=causal,
                                                    scale=scale, q_doc=q_doc, k_doc=k_doc,
                                                    delta=delta)


def linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = -100, z_loss: float = 0.0):
    """Mean CE of hidden [N, D] @ weight[V, D].T against labels [N], without full logits."""
    fn = dispatch.get("linear_cross_entropy", hidden.device)
    chunk = dispatch.setting("ce_chunk_tokens") or ce_chunk_auto(weight.shape[0], hidden.device)
    return fn(hidden, weight, labels, ignore_index=ignore_index, z_loss=z_loss, chunk=chunk)


def ce_chunk_auto(vocab: int, device) -> int:
    """Tokens per CE chunk when the recipe says 0: 2048, except on CPU, where a chunk's fp32 logits
    stay within 16 MiB. glibc serves blocks of 32 MiB and more with a fresh mmap every time, so a
    bigger chunk page-faults its whole buffer on every step (measured: vocab 4096, 2048 rows ->
    1024 rows made the fused loss ~10% faster)."""
    if getattr(device, "type", str(device)) != "cpu":
        return 2048
    rows = (16 << 20) // (4 * vocab)
    return max(64, min(2048, 1 << max(rows, 1).bit_length() - 1))


def moe_permute(x, expert_idx, num_experts: int):
    """Copy token rows x [N, D] to their k experts: (x_perm [N*k, D] grouped by ascending expert,
    stable within one, tokens_per_expert [E], row_map [N, k] = x_perm row of each choice)."""
    return dispatch.get("moe_permute", x.device)(x, expert_idx, num_experts)


def moe_unpermute(y_perm, row_map, weights):
    """Combine expert outputs y_perm [N*k, D] back to [N, D]: sum_c weights[n, c] * y_perm[row_map[n, c]]."""
    return dispatch.get("moe_unpermute", y_perm.device)(y_perm, row_map, weights)


def grouped_linear(x, w, sizes: list, ids):
    """MoE expert GEMMs: rows of x [M, K] in consecutive groups of `sizes` rows, group j times
    w[ids[j]].T for stacked weights w [G, N, K]; x must have rows. Returns [M, N]."""
    return dispatch.get("grouped_linear", x.device)(x, w, sizes, ids)


def configure(cfg: KernelsConfig) -> None:
    """Apply the recipe's kernels section."""
    dispatch.configure(cfg.use, cfg.ce_chunk_tokens)


__all__ = ["KernelsConfig", "apply_rope", "attention", "attention_bwd", "attention_fwd", "configure", "load",
           "dispatch", "grouped_linear", "linear_cross_entropy", "moe_permute", "moe_unpermute", "rms_norm",
           "rope_cos_sin", "swiglu"]
