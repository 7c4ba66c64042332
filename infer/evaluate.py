"""The held-out evaluation: one loop shared by the trainer's eval step, `kiln eval`,
`kiln profile-routing` and the benches, so every reported held-out loss means the same thing."""
import math

import torch


def batch_losses(loss_fn, batches) -> tuple[float, int]:
    """(sum, count) of `loss_fn(batch)` over `batches`, without gradients. Each loss is one
    batch's mean; callers average sum / count (the trainer then across ranks).

    Tagged batches (kiln.data.decompose_loader.TaggedBatch: `tag`, `weight`) count `weight` times,
    so sum / count is their weighted mean, and `batches.per_tag` (when the iterable has it) gets
    each tag's [loss sum, batches]: the per-bucket losses of a decomposition evaluation.
    """
    per_tag = getattr(batches, "per_tag", None)
    total, n = 0, 0
    with torch.no_grad():
        for b in batches:
            loss = float(loss_fn(b))
            w = getattr(b, "weight", None)
            if w is None:
                total, n = total + loss, n + 1
                continue
            total, n = total + w * loss, n + w
            if per_tag is not None:
                s = per_tag.setdefault(b.tag, [0.0, 0])
                s[0], s[1] = s[0] + loss, s[1] + 1
    return total, n


def lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (a kiln Transformer) on one batch: the causal
    objective's loss in eval mode (no router losses)."""
    hidden = model(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))
    return model.head(hidden, labels=batch["labels"])


def heldout_loss(model, batches) -> dict:
    """Held-out loss and perplexity of `model` on `batches` (eval mode for the call)."""
    was_training = model.training
    model.eval()
    try:
        total, n = batch_losses(lambda b: lm_loss(model, b), batches)
    finally:
        model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "batches": 0}
    loss = total / n
    return {"loss": loss, "ppl": math.exp(loss), "batches": n}
