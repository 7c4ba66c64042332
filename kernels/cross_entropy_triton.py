"""Fused linear + cross-entropy, Triton path: same chunk loop as the torch path (cross_entropy.py).

Per chunk the logits come from one torch matmul; a Triton kernel then makes two passes over
each row: an online logsumexp, then it overwrites the logits *in place* with their gradient
softmax * (1 + 2 z lse) - onehot(label) (zero on ignored rows). The matmuls dh = g @ W and
dW += g.T @ h finish the chunk, so one [chunk, vocab] buffer is the only vocab-sized tensor.
"""
import torch
import triton
import triton.language as tl

from kiln.kernels.cross_entropy import LinearCE, accumulate_grads
from kiln.kernels.triton_util import check_device, next_pow2, row_programs


@triton.jit
def _ce_rows(LOGITS, LABELS, LOSS, n_rows, V, stride, ignore_index, z_loss,
             WANT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_V)
    for row in range(pid, n_rows, progs):
        base = LOGITS + tl.cast(row, tl.int64) * stride
        # pass 1: lane-wise online max / sum of exp; the finite start keeps exp(m_old - m_new)
        # free of inf - inf for lanes that only ever see the masked tail
        m = tl.full([BLOCK_V], -1.0e30, tl.float32)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            acc = acc * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        mx = tl.max(m, axis=0)
        lse = mx + tl.log(tl.sum(acc * tl.exp(m - mx), axis=0))
        label = tl.load(LABELS + row)
        valid = (label != ignore_index) & (label >= 0) & (label < V)
        tgt = tl.where(valid, label, 0)
        picked = tl.load(base + tgt).to(tl.float32)
        loss = tl.where(valid, lse - picked + z_loss * lse * lse, 0.0)
        tl.store(LOSS + row, loss)
        if WANT_GRAD:
            gscale = tl.where(valid, 1.0 + 2.0 * z_loss * lse, 0.0)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                cm = cols < V
                x = tl.load(base + cols, mask=cm, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * gscale
                g = tl.where((cols == tgt) & valid, g - 1.0, g)
                tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=cm)


def triton_chunk(h, w, y, ignore_index, z_loss, dh_out, dw_acc):
    """Loss sum of one chunk with the Triton CE kernel; gradients as in cross_entropy.torch_chunk."""
    logits = h @ w.t()
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    want = dh_out is not None or dw_acc is not None
    if n:
        block_v = min(next_pow2(V, 16), 4096 if h.is_cuda else 1024)
        _ce_rows[(row_programs(n, h.device),)](logits, y, loss, n, V, logits.stride(0),
                                              int(ignore_index), float(z_loss),
                                              WANT_GRAD=want, BLOCK_V=block_v)
    if want:
        accumulate_grads(logits, h, w, dh_out, dw_acc)
    return loss.sum()


def linear_cross_entropy_triton(hidden, weight, labels, *, ignore_index=-100, z_loss=0.0, chunk=2048):
    """Mean CE (+ z_loss * lse^2) of hidden [N, D] @ weight[V, D].T against labels [N]; Triton CE.

    Same contract as kernels.cross_entropy.linear_cross_entropy_ref, except that a label outside
    [0, V) (other than ignore_index) adds zero loss and gradient here where the torch path raises.
    """
    check_device(hidden)
    labels = labels.contiguous()
    return LinearCE.apply(hidden, weight, labels, ignore_index, float(z_loss), int(chunk), triton_chunk)
