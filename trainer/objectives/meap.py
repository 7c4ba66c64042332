"""MEAP: mask-enhanced autoregressive prediction (../shared/METHODS.md section 6).

Next-token prediction whose *inputs* have a fraction of positions replaced by the MASK token:
the labels stay the original next tokens, attention stays causal, and there is no extra head or
compute, so the loss, the model call and flops_per_token are exactly CausalLM's. The masks are
drawn in prepare_batch, on the whole batch before sequence-parallel sharding, from
generator(step) (seeded by (seed, step, rank)), so SP=1 and SP=2 see identical inputs and a
resumed run redraws the masks of the uninterrupted one.

The SFT variant (`sft=True`, on prompt/response rows of kiln.data.sft whose labels cover the
response only) masks `sft_ratio` (0.1) of the *response* input positions, and trains on the
masked copy as an extra example: prepare_batch returns the original rows followed by their
masked copies, with the same labels, so each example is seen clean and masked (twice the FLOPs).
"""
import torch

from kiln.trainer.objectives.clm import CausalLM


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the input positions holding a response token that has a label itself (the
    token at i is a response token when it was the label of i - 1; SFT rows label the response only)."""
    resp = torch.zeros_like(labels, dtype=torch.bool)
    resp[:, 1:] = labels[:, :-1] != -100
    return resp & (labels != -100)


def meap_mask(labels: torch.Tensor, ratio: float, same_positions: bool, gen: torch.Generator) -> torch.Tensor:
    """[B, S] bool: the input positions to replace by MASK.

    Each position is masked with probability `ratio` (a Bernoulli draw, so the masked fraction
    is binomial around the ratio). Per row by default; `same_positions` draws one set of
    positions and applies it to every row (what the authors' code does). Positions without a
    label (-100: a document's last token in concat packing, a chunk end in decomposition) are
    never masked, so that no masked input sits where no loss could teach it.
    """
    b, s = labels.shape
    shape = (1, s) if same_positions else (b, s)
    draw = torch.rand(shape, generator=gen) < ratio
    return draw.expand(b, s) & (labels != -100)


class MEAP(CausalLM):
    """CausalLM on inputs with `mask_ratio` of the positions replaced by `mask_id`."""

    def __init__(self, model, mask_id: int, mask_ratio: float = 0.15, same_positions: bool = False,
                 z_loss: float = 0.0, loss_group=None, seed: int = 0, rank: int = 0, sft: bool = False,
                 sft_ratio: float = 0.1):
        super().__init__(model, z_loss=z_loss, loss_group=loss_group, seed=seed, rank=rank)
        self.mask_id, self.mask_ratio, self.same_positions = mask_id, mask_ratio, same_positions
        self.sft, self.sft_ratio = sft, sft_ratio
        self.mask_rate = 0.0  # realised fraction of the last prepared batch (logged by loss)

    @classmethod
    def build(cls, model, cfg, *, loss_group=None, seed: int = 0, rank: int = 0, mask_id=None) -> "MEAP":
        if mask_id is None:
            raise ValueError("MEAP needs the tokenizer's MASK id (kiln.data.tokenizer.MASK)")
        m = cfg.meap
        return cls(model, mask_id=mask_id, mask_ratio=m.mask_ratio, same_positions=m.same_positions_per_batch,
                   z_loss=cfg.z_loss, loss_group=loss_group, seed=seed, rank=rank, sft=m.sft,
                   sft_ratio=m.sft_mask_ratio)

    def prepare_batch(self, batch: dict, step: int) -> dict:
        """The batch with masked inputs; labels, positions and document ids untouched."""
        labels = batch["labels"]
        if self.sft:
            return self.prepare_sft(batch, step)
        mask = meap_mask(labels, self.mask_ratio, self.same_positions, self.generator(step))
        eligible = int((labels != -100).sum())
        self.mask_rate = float(mask.sum()) / max(eligible, 1)
        return {**batch, "input_ids": batch["input_ids"].masked_fill(mask, self.mask_id)}

    def prepare_sft(self, batch: dict, step: int) -> dict:
        """The rows, then their copies with sft_ratio of the response inputs masked (labels kept)."""
        resp = response_positions(batch["labels"])
        mask = meap_mask(batch["labels"], self.sft_ratio, self.same_positions, self.generator(step)) & resp
        self.mask_rate = float(mask.sum()) / max(int(resp.sum()), 1)
        copy = {**batch, "input_ids": batch["input_ids"].masked_fill(mask, self.mask_id)}
        return {k: torch.cat([batch[k], copy[k]]) for k in batch}

    def flops_per_token(self, seq_len: int) -> float:
        """CausalLM's; twice that for SFT, whose every example also trains as its masked copy."""
        return super().flops_per_token(seq_len) * (2 if self.sft else 1)

    def loss(self, input_ids, labels, position_ids=None, doc_ids=None):
        loss, metrics = super().loss(input_ids, labels, position_ids=position_ids, doc_ids=doc_ids)
        if self.training:
            metrics = {**metrics, "mask_rate": self.mask_rate}
        return loss, metrics
