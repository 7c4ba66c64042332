"""The eager torch path for ops where another arrangement of torch calls is measurably faster
than the plain reference (kiln.kernels.reference stays the test oracle; tests compare the two).

Measured on the tiny recipe's shapes, fp32, 2 CPU threads, forward + backward (bench/throughput.py
has the whole step):
  * attention: SDPA's own GQA (`enable_gqa`) instead of copying K/V to every query head
    (17.0 -> 14.8 ms per layer; with a document mask 24.4 -> 22.6 ms). On CUDA only without a
    mask: masked SDPA there lands on the memory-efficient backend, which does not take the flag
    and would fall back to the math one. In the whole step (bench/throughput.py) ~8 ms of ~450.
Tried and dropped: RoPE as two full-width multiplies against [cos, cos] / [-sin, sin] is faster
alone (2.5 -> 1.8 ms) but slower inside the step (+15 ms), so rope stays the reference.
"""
import torch
import torch.nn.functional as F

from kiln.kernels.reference import attention_mask, attention_ref


def attention_eager(q, k, v, *, causal: bool, scale: float | None = None, doc_ids=None):
    """attention_ref's result; K/V heads are shared through SDPA's GQA flag (see module doc)."""
    if q.shape[2] == k.shape[2] or (doc_ids is not None and q.device.type != "cpu"):
        return attention_ref(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if doc_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=True)
    else:
        mask = attention_mask(q.shape[1], k.shape[1], causal, doc_ids, doc_ids, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)
