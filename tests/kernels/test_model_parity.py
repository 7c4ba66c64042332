"""A tiny transformer trains the same with kernels.use=torch and kernels.use=triton (interpreter):
same losses and weights after a few AdamW steps, within fp32 rounding."""
import copy

import pytest
import torch

import kiln.kernels as K
from kiln.kernels.config import KernelsConfig
from kiln.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("interp")

STEPS = 4
# Per step the two paths differ only by fp32 rounding (~1e-6 relative); Adam's normalised update
# can amplify that for near-zero gradients, so weights get 1e-4 after 4 steps of lr 1e-2.
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)
WEIGHT_TOL = dict(atol=1e-4, rtol=1e-4)


def _batch(vocab, b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s + 1), generator=g)
    doc_ids = torch.cat([torch.zeros(b, 13, dtype=torch.long), torch.ones(b, s - 13, dtype=torch.long)], 1)
    pos = torch.cat([torch.arange(13), torch.arange(s - 13)]).expand(b, s)
    labels = ids[:, 1:].clone()
    labels[:, 12] = -100  # no prediction across the document boundary
    return ids[:, :-1], pos, doc_ids, labels


def _train(model, use):
    K.configure(KernelsConfig(use=use, ce_chunk_tokens=24))  # 64 tokens -> 3 chunks
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    ids, pos, doc_ids, labels = _batch(model.cfg.vocab_size)  # one batch: the loss must fall
    for _ in range(STEPS):
        hidden = model(ids, position_ids=pos, doc_ids=doc_ids)
        # the final RMSNorm shows which path ran
        assert (type(hidden.grad_fn).__name__ == "_RMSNormBackward") == (use == "triton")
        loss = model.head(hidden, labels, z_loss=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_trains_the_same_on_both_paths():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    cfg.validate()
    base = Transformer(cfg)
    ref_model, tri_model = copy.deepcopy(base), copy.deepcopy(base)
    ref_losses = _train(ref_model, "torch")
    tri_losses = _train(tri_model, "triton")
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it does learn
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), **LOSS_TOL)
    for (name, p), q in zip(tri_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **WEIGHT_TOL, msg=lambda m: f"{name}: {m}")
