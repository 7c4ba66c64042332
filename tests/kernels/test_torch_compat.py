"""Fallbacks for an older torch (the GPU image has 2.11, kiln pins 2.13): each says so in one line."""
import torch
import torch.nn.functional as F

from kiln.kernels import eager
from kiln.kernels.moe import grouped_linear_ref
from kiln.kernels.reference import attention_ref


def test_no_grouped_mm_runs_the_loop_and_says_so(monkeypatch, capsys):
    monkeypatch.delattr(F, "grouped_mm")
    monkeypatch.setattr(eager, "_SAID", set())
    x, w = torch.randn(20, 32, dtype=torch.float64), torch.randn(3, 16, 32, dtype=torch.float64)
    for _ in range(2):  # the note comes once
        y = eager.grouped_linear_eager(x.float(), w.float(), [7, 0, 13], [0, 1, 2])
        torch.testing.assert_close(y.double(), grouped_linear_ref(x, w, [7, 0, 13], [0, 1, 2]), rtol=1e-5, atol=1e-5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "has no F.grouped_mm; MoE experts run one GEMM per expert" in lines[0]


def test_sdpa_without_enable_gqa_copies_kv_heads(monkeypatch, capsys):
    assert eager.sdpa_takes_gqa() is True  # this torch (2.13) has it
    monkeypatch.setattr(eager, "sdpa_takes_gqa", lambda: False)
    monkeypatch.setattr(eager, "_SAID", set())
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    out = eager.attention_eager(q, k, v, causal=True)
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True))
    assert "has no SDPA enable_gqa" in capsys.readouterr().err
