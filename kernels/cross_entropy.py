"""Fused linear + cross-entropy, torch path: chunked so the [tokens, vocab] logits never exist whole.

Gradients for the hidden states and the head weight are computed chunk by chunk during the
forward pass (logits of one chunk live at a time, turned into their own gradient in place) and
scaled by the incoming gradient in backward. The Triton path (cross_entropy_triton.py) reuses the
chunk loop below and swaps only the per-chunk softmax/CE/gradient step.
"""
import torch


def torch_chunk(h, w, y, ignore_index, z_loss, dh_out, dw_acc):
    """Loss sum of one chunk; writes d(loss sum)/dh into dh_out and adds d/dw into dw_acc (if given)."""
    logits = h @ w.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    valid = y != ignore_index
    tgt = torch.where(valid, y, torch.zeros_like(y))
    picked = logits.gather(1, tgt[:, None]).squeeze(1)
    # logsumexp by hand, in place: torch.logsumexp would allocate a second [chunk, vocab] tensor
    mx = logits.amax(dim=-1, keepdim=True)
    p = logits.sub_(mx).exp_()  # unnormalised softmax, in the logits buffer
    sumexp = p.sum(dim=-1)
    lse = sumexp.log() + mx.squeeze(1)
    loss = ((lse - picked + z_loss * lse * lse) * valid).sum()
    if dh_out is None and dw_acc is None:
        return loss
    # d(per_tok)/d(logits) = softmax * (1 + 2 z lse) - onehot(target), zero on ignored rows
    p.mul_(((1.0 + 2.0 * z_loss * lse) / sumexp)[:, None])
    p[torch.arange(len(y), device=y.device), tgt] -= 1.0
    if not bool(valid.all()):  # a pass over the whole chunk, only needed when labels are ignored
        p.mul_(valid[:, None].to(p.dtype))
    accumulate_grads(p.to(h.dtype), h, w, dh_out, dw_acc)
    return loss


def accumulate_grads(g, h, w, dh_out, dw_acc):
    """dh_out = g @ w and dw_acc += g.T @ h for one chunk's logit gradient g."""
    if dh_out is not None:
        torch.mm(g, w, out=dh_out)
    if dw_acc is not None:
        if dw_acc.dtype == g.dtype:
            dw_acc.addmm_(g.t(), h)
        else:
            dw_acc += (g.t() @ h).to(dw_acc.dtype)


class LinearCE(torch.autograd.Function):
    """Chunked linear + CE; `chunk_fn` (torch_chunk or the Triton one) handles one chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, z_loss, chunk, chunk_fn):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_h else None
        # the head gradient accumulates over chunks, so keep it in at least fp32
        dw = torch.zeros_like(weight, dtype=acc_dtype) if want_w else None
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            total += chunk_fn(hidden[s:e], weight, labels[s:e], ignore_index, z_loss,
                              dh[s:e] if want_h else None, dw)
        n = (labels != ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(dh, dw.to(weight.dtype) if want_w else None, n)
        return (total / n).to(hidden.dtype if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad):
        dh, dw, n = ctx.saved_tensors
        scale = grad / n
        gh = dh * scale.to(dh.dtype) if dh is not None else None
        gw = dw * scale.to(dw.dtype) if dw is not None else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy_ref(hidden, weight, labels, *, ignore_index=-100, z_loss=0.0, chunk=2048):
    """Mean cross-entropy (+ z_loss * lse^2) of softmax(hidden @ weight.T) over non-ignored labels.

    hidden [N, D], weight [V, D], labels [N]. Returns a scalar; 0 when every label is ignored.
    """
    return LinearCE.apply(hidden, weight, labels, ignore_index, float(z_loss), int(chunk), torch_chunk)


def naive_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, z_loss=0.0):
    """Unfused reference: full logits then torch cross_entropy (the test oracle and bench baseline)."""
    logits = hidden @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if z_loss:
        valid = labels != ignore_index
        loss = loss + z_loss * (torch.logsumexp(logits, -1)[valid] ** 2).sum()
    return loss / (labels != ignore_index).sum().clamp(min=1)
