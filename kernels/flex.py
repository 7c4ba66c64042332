"""Document masks as FlexAttention block masks (torch.nn.attention.flex_attention), without a
dense [B, 1, S, S] mask.

`doc_block_mask` turns doc_ids [B, S] (+ causal) into a BlockMask: per (row, query block) the
key blocks that hold any allowed pair, so the kernel never visits a block whose queries share no
document with its keys (the same rule as the Triton kernels' tile skip, kiln.kernels.flash_attention
.tile_counts). `attention_flex` runs flex_attention over it with the kiln attention contract
(q [B, S, Hq, D], k/v [B, S, Hkv, D], GQA).

Where it runs: CUDA, compiled (flex_attention is only a fused kernel under torch.compile; eager
flex materialises the full score matrix). On CPU kiln keeps SDPA with the dense mask: torch 2.13
does run flex on CPU, eagerly (unfused, no saving) and compiled (a C++ kernel; ~160 s to compile
one shape on the 2-core test box), so the tests check the masks and numbers eagerly on CPU and
the CUDA path is correct by construction but untested here (docs/kernels.md).
"""
import functools

import torch


@functools.cache
def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
        return True
    except ImportError:
        return False


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def doc_block_mask(doc_ids: torch.Tensor, *, causal: bool, block: int = 128):
    """The BlockMask of document masks `doc_ids` [B, S] (+ causal, top-left aligned)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = doc_ids.shape
    doc = doc_ids

    def allowed(b, h, q, k):
        same = doc[b, q] == doc[b, k]
        return same & (k <= q) if causal else same

    return create_block_mask(allowed, B, None, S, S, device=doc.device, BLOCK_SIZE=block,
                             _compile=doc.device.type == "cuda")


def attention_flex(q, k, v, *, causal: bool, scale: float | None = None, doc_ids=None,
                   compiled: bool = True, block: int = 128):
    """Attention with document masks through FlexAttention's block mask (see the module doc).

    A row that sees no key gives 0, like the reference (a query always sees itself when causal
    and doc_ids masks by its own document, so with kiln's masks no row is empty)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, S = q.shape[:2]
    mask = doc_block_mask(doc_ids, causal=causal, block=min(block, S)) if doc_ids is not None else None
    fn = _compiled_flex() if compiled else flex_attention
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = fn(qt, kt, vt, block_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)
