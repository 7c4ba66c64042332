"""A key/value cache for decoding, plugged into the model through Attention's `attn_fn` seam.

The model stays as trained: `KVCache.attached(model)` swaps every Attention's attn_fn for one that
appends this step's (RoPE'd) keys and values to its layer's slot and attends over everything
cached so far, then restores the originals. Rows of a batch are left-padded to a common length;
`valid` marks the real keys and `pos` holds every key's position, so each query attends to the
real keys of its own row at positions <= its own.
"""
import contextlib

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for `batch` rows of up to `max_len` tokens."""

    def __init__(self, cfg, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.length = 0        # tokens cached (per row, padding included)
        self._step = None      # (positions [B, s], valid [B, s]) of the tokens being fed

    def feed(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Declare the next forward's tokens: their positions and which are real (not padding)."""
        s = positions.shape[1]
        if self.length + s > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.length} + {s} tokens > {self.k.shape[2]}")
        self.valid[:, self.length:self.length + s] = valid
        self.pos[:, self.length:self.length + s] = positions
        self._step = (positions, valid)

    def advance(self) -> None:
        """The forward ran: its tokens are now cached."""
        self.length += self._step[0].shape[1]
        self._step = None

    def attention(self, layer: int):
        """The attn_fn of layer `layer`: cache this step's k/v, attend over the cache."""
        def attn(q, k, v, *, causal, scale, doc_ids):
            b, s = q.shape[:2]
            lo, hi = self.length, self.length + s
            self.k[layer, :, lo:hi] = k
            self.v[layer, :, lo:hi] = v
            q_pos = self._step[0]
            allowed = self.valid[:, None, :hi] & (self.pos[:, None, :hi] <= q_pos[:, :, None]) if causal \
                else self.valid[:, None, :hi].expand(b, s, hi)
            # a padding query sees itself, so no row is fully masked (its output is never used)
            own = torch.arange(hi, device=q.device)[None, None, :] == torch.arange(lo, hi, device=q.device)[None, :, None]
            mask = (allowed | own)[:, None]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), self.k[layer, :, :hi].transpose(1, 2), self.v[layer, :, :hi].transpose(1, 2),
                attn_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
            return out.transpose(1, 2)
        return attn

    @contextlib.contextmanager
    def attached(self, model):
        """Within the block, `model`'s attention layers read and write this cache."""
        layers = [blk.attn for blk in model.layers]
        saved = [a.attn_fn for a in layers]
        try:
            for i, a in enumerate(layers):
                a.attn_fn = self.attention(i)
            yield self
        finally:
            for a, fn in zip(layers, saved):
                a.attn_fn = fn
