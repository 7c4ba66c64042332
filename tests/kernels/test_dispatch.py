"""The single dispatch point: auto -> torch on CPU (Triton on CUDA), forced triton -> the Triton
kernels (interpreter here), forced torch -> the references; both paths agree through kiln.kernels."""
import types

import pytest
import torch

import kiln.kernels as K
from kiln.kernels import dispatch
from kiln.kernels.config import KernelsConfig

OPS = ["rms_norm", "swiglu", "rope", "attention", "attention_fwd", "attention_bwd",
       "linear_cross_entropy", "moe_permute", "moe_unpermute"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def _ops_outputs():
    """Run every public op once on CPU; return (outputs, grad_fn class names of the first ones)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, 8, generator=g, requires_grad=True)
    w = torch.rand(8, generator=g) + 0.5
    cos, sin = K.rope_cos_sin(torch.arange(5)[None], 8, 100.0)
    outs = {
        "rms_norm": K.rms_norm(x, w, 1e-5),
        "swiglu": K.swiglu(x, x * 2),
        "rope": K.apply_rope(x, cos, sin),
        "attention": K.attention(x, x, x, causal=True),
        "linear_cross_entropy": K.linear_cross_entropy(x.reshape(-1, 8), torch.randn(11, 8, generator=g),
                                                       torch.arange(30) % 11),
    }
    xp, _, row_map = K.moe_permute(x.reshape(-1, 8), torch.arange(30)[:, None] % 4, 4)
    outs["moe_permute"] = xp
    outs["moe_unpermute"] = K.moe_unpermute(xp, row_map, torch.ones(30, 1))
    o, lse = K.attention_fwd(x, x, x, causal=False, scale=0.3)
    outs["attention_fwd"] = o
    outs["attention_bwd"] = K.attention_bwd(torch.ones_like(o), x, x, x, o, lse, causal=False, scale=0.3)[0]
    return outs


def test_every_op_has_both_backends():
    for op in OPS:
        assert set(dispatch._IMPLS[op]) == {"torch", "triton"}, op


def test_auto_picks_torch_on_cpu_and_triton_on_cuda():
    dispatch.configure("auto")
    for op in OPS:
        assert dispatch.backend_for(op, CPU) == "torch"
        assert dispatch.backend_for(op, CUDA) == "triton"
    outs = _ops_outputs()
    assert type(outs["rms_norm"].grad_fn).__name__ != "_RMSNormBackward"
    assert type(outs["attention"].grad_fn).__name__ != "_FlashAttentionBackward"


def test_forced_torch_everywhere():
    K.configure(KernelsConfig(use="torch"))
    for op in OPS:
        assert dispatch.backend_for(op, CPU) == dispatch.backend_for(op, CUDA) == "torch"


@pytest.mark.usefixtures("interp")
def test_forced_triton_runs_the_kernels_and_agrees_with_torch():
    dispatch.configure("torch")
    want = _ops_outputs()
    K.configure(KernelsConfig(use="triton"))
    for op in OPS:
        assert dispatch.backend_for(op, CPU) == "triton"
    got = _ops_outputs()
    names = {op: type(t.grad_fn).__name__ for op, t in got.items()}
    assert names["rms_norm"] == "_RMSNormBackward" and names["swiglu"] == "_SwiGLUBackward"
    assert names["rope"] == "_RopeBackward" and names["attention"] == "_FlashAttentionBackward"
    assert names["moe_permute"] == "_PermuteBackward" and names["moe_unpermute"] == "_UnpermuteBackward"
    # importing the Triton modules must not shadow the public functions of kiln.kernels
    assert all(not isinstance(getattr(K, n), types.ModuleType) for n in K.__all__ if n != "dispatch")
    for op in OPS:
        torch.testing.assert_close(got[op], want[op].to(got[op].dtype), atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{op}: {m}")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from kiln.kernels.triton_util import TritonUnavailableError, check_device
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET=1"):
        check_device(torch.zeros(1))


def test_bad_choice_is_rejected():
    with pytest.raises(ValueError, match="auto, triton or torch"):
        dispatch.configure("cuda")
    from kiln.trainer.config import ConfigError, check_section  # where recipe ranges are enforced

    with pytest.raises(ConfigError, match="ce_chunk_tokens"):
        check_section(KernelsConfig(ce_chunk_tokens=-1), "kernels")
    check_section(KernelsConfig(ce_chunk_tokens=0), "kernels")  # 0 = auto


def test_ce_chunk_auto_keeps_cpu_chunks_within_16_mib():
    from kiln.kernels import ce_chunk_auto
    cpu = torch.device("cpu")
    assert ce_chunk_auto(4096, cpu) == 1024  # 1024 x 4096 x 4 B = 16 MiB
    assert ce_chunk_auto(32000, cpu) == 128
    assert ce_chunk_auto(97, cpu) == 2048 and ce_chunk_auto(10**6, cpu) == 64  # clamped
    assert ce_chunk_auto(4096, torch.device("cuda")) == 2048
    for v in (1000, 4096, 32000, 50257):
        c = ce_chunk_auto(v, cpu)
        assert c & (c - 1) == 0 and (c * v * 4 <= 16 << 20 or c == 64)
