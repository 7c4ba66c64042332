"""MLM: BERT-style masked language modelling on the bidirectional encoder (model.causal=false).

Each step `mask_ratio` (0.15) of the positions are selected, drawn per row in prepare_batch on
the whole batch before sequence-parallel sharding from generator(step) (seeded by (seed, step,
rank)), like MEAP's masks. Of the selected positions `mask_fraction` (0.8) become MASK,
`random_fraction` (0.1) a uniformly random token of the vocabulary, and the rest keep their
token; the loss is the cross-entropy of the original token at the selected positions only (the
LM head runs on those rows alone, so its FLOPs are mask_ratio of a causal model's).

The prepared batch carries `labels` = the original token at selected positions, -100 elsewhere
(so token_share and the data's global token mean count the predicted tokens), and `targets` =
the original tokens everywhere. A batch that was not prepared (the trainer's held-out
evaluation hands the loss plain batches) is masked inside `loss` from a fixed evaluation draw,
so that every evaluation of a run scores the same masks.
"""
import torch

from kiln.model.flops import flops_per_token
from kiln.trainer.objectives.base import Objective

EVAL_STEP = 2**31 - 1  # the `step` of the evaluation draws (no training step reaches it)


def select_positions(shape, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """[B, S] bool: each position selected with probability `ratio`, independently per row."""
    return torch.rand(shape, generator=gen) < ratio


def needs_encoder(name: str, model) -> None:
    """The one-line error for an MLM-style objective on a causal model."""
    if model.cfg.causal:
        from kiln.trainer.config import ConfigError  # lazy: trainer.config imports this package's config

        raise ConfigError(f"objective.name={name} trains a bidirectional encoder: set model.causal=false")


class MLM(Objective):
    """Masked language modelling (see the module docstring)."""

    def __init__(self, model, mask_id: int, mask_ratio: float = 0.15, mask_fraction: float = 0.8,
                 random_fraction: float = 0.1, z_loss: float = 0.0, loss_group=None, seed: int = 0, rank: int = 0):
        super().__init__(model, loss_group=loss_group, seed=seed, rank=rank)
        self.mask_id, self.mask_ratio = mask_id, mask_ratio
        self.mask_fraction, self.random_fraction, self.z_loss = mask_fraction, random_fraction, z_loss
        self.mask_rate = 0.0  # realised selected fraction of the last prepared batch

    @classmethod
    def build(cls, model, cfg, *, loss_group=None, seed: int = 0, rank: int = 0, mask_id=None) -> "MLM":
        if mask_id is None:
            raise ValueError("MLM needs the tokenizer's MASK id (kiln.data.tokenizer.MASK)")
        needs_encoder("mlm", model)
        m = cfg.mlm
        return cls(model, mask_id=mask_id, mask_ratio=m.mask_ratio, mask_fraction=m.mask_fraction,
                   random_fraction=m.random_fraction, z_loss=cfg.z_loss, loss_group=loss_group, seed=seed, rank=rank)

    def mask(self, ids: torch.Tensor, gen: torch.Generator) -> dict:
        """input_ids (corrupted), labels and targets for the original tokens `ids` [B, S]."""
        selected = select_positions(ids.shape, self.mask_ratio, gen)
        kind = torch.rand(ids.shape, generator=gen)  # which corruption a selected position gets
        random_ids = torch.randint(0, self.model.cfg.vocab_size, ids.shape, generator=gen)
        to_mask = selected & (kind < self.mask_fraction)
        to_random = selected & (kind >= self.mask_fraction) & (kind < self.mask_fraction + self.random_fraction)
        inputs = torch.where(to_random, random_ids, ids).masked_fill(to_mask, self.mask_id)
        return {"input_ids": inputs, "labels": ids.masked_fill(~selected, -100), "targets": ids}

    def prepare_batch(self, batch: dict, step: int) -> dict:
        """The batch with corrupted inputs, MLM labels and the original tokens; positions and
        documents untouched."""
        out = self.mask(batch["input_ids"], self.generator(step))
        self.mask_rate = float((out["labels"] != -100).float().mean())
        return {**batch, **out}

    def eval_batch(self, input_ids, labels, targets):
        """(input_ids, labels, targets): the prepared ones, or a plain batch masked from the
        evaluation draw (on the CPU, then back on the batch's device)."""
        if targets is not None:
            return input_ids, labels, targets
        out = self.mask(input_ids.cpu(), self.generator(EVAL_STEP))
        return tuple(out[k].to(input_ids.device) for k in ("input_ids", "labels", "targets"))

    def loss(self, input_ids, labels, position_ids=None, doc_ids=None, targets=None):
        input_ids, labels, targets = self.eval_batch(input_ids, labels, targets)
        hidden = self.model(input_ids, position_ids=position_ids, doc_ids=doc_ids)
        selected = labels != -100
        picked = hidden[selected]
        if len(picked):
            loss = self.model.head(picked, labels=labels[selected], z_loss=self.z_loss)
        else:  # a rank without a selected token (a tiny batch) adds nothing, rather than a NaN mean
            loss = hidden.sum() * 0
        metrics = {}
        if self.training:
            with torch.no_grad():
                pred = self.model.head(picked.detach()).argmax(-1)
            metrics = {"mask_rate": self.mask_rate,
                       "mlm_acc": (pred == labels[selected]).float().mean().detach()}
        return self.scale_and_regularise(loss, labels), metrics

    def flops_per_token(self, seq_len: int) -> float:
        """The encoder's FLOPs with the LM head on the selected positions only."""
        cfg = self.model.cfg
        return flops_per_token(cfg, seq_len) - 6 * cfg.dim * cfg.vocab_size * (1 - self.mask_ratio)
