"""Torch reference implementations of every fused op (the CPU path and the test oracle)."""
import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 (or fp64) and cast back."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype)).to(x.dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up."""
    return F.silu(gate) * up


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32):
    """cos/sin tables [B, S, head_dim/2] for integer positions [B, S] (rotate-half layout)."""
    half = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(half, device=position_ids.device, dtype=torch.float64) / half))
    ang = position_ids.to(torch.float64).unsqueeze(-1) * inv
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, S, H, D] with cos/sin [B, S, D/2]; halves rotate as pairs."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def attention_mask(q_len: int, k_len: int, causal: bool, q_doc=None, k_doc=None, device=None):
    """Boolean [B|1, 1, Sq, Sk] mask (True = may attend), or None when nothing is masked."""
    mask = None
    if causal:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]
    if q_doc is not None:
        same = (q_doc[:, :, None] == k_doc[:, None, :])[:, None]
        mask = same if mask is None else (mask & same)
    return mask


def attention_ref(q, k, v, *, causal: bool, scale: float | None = None, doc_ids=None):
    """Attention of q [B, S, Hq, D] over k/v [B, S, Hkv, D] through torch SDPA.

    GQA shares each kv head among Hq/Hkv query heads; doc_ids [B, S] keep packed documents
    from attending to each other.
    """
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    if rep > 1:  # expand kv heads; SDPA's own GQA flag is not taken by every backend
        kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    if doc_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
    else:
        mask = attention_mask(q.shape[1], k.shape[1], causal, doc_ids, doc_ids, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
