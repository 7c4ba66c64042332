"""ELECTRA: replaced-token detection (../shared/METHODS.md section 7).

The recipe's model is the discriminator, a bidirectional encoder (model.causal=false). The
objective builds a small generator beside it and owns both, so one DeepSpeed engine, one
optimizer and one checkpoint hold the two:
  * the generator: the discriminator's token embedding (the same nn.Parameter: kiln's models
    use RoPE, so there is no position embedding to share), projected down to its width
    (generator_width x model.dim, whole heads of the discriminator's head size, as many layers),
    dense SwiGLU blocks, projected back up and scored against that same embedding (a tied head);
  * masking: mask_ratio (0.15) of the positions become MASK (no random or kept tokens), drawn in
    prepare_batch before sequence-parallel sharding from generator(step), like MEAP's masks;
  * sampling: each masked position is filled by a token sampled from the generator's softmax,
    by inverse CDF from one uniform per position drawn in prepare_batch (`noise`), so a resumed
    run samples what the uninterrupted one did; the logits are detached first, so no gradient
    flows through sampling, and MASK itself is never drawn (the discriminator never sees it);
  * the discriminator sees the sampled text and predicts for every token whether it was
    replaced; a sample equal to the original counts as original;
  * loss = MLM_gen (mean over masked positions) + disc_weight (50) * RTD (mean BCE over every
    token). The window logs gen_mlm_acc, disc_acc and replaced_frac.
The discriminator's own LM head takes no part (frozen when untied, so that no optimizer state
or gradient reduction is spent on it); checkpoints hold it as built.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln import kernels
from kiln.model.config import ModelConfig
from kiln.model.flops import attention_flops, matmul_params
from kiln.model.moe import moe_aux_loss
from kiln.model.transformer import Block, OutputHead, RMSNorm
from kiln.parallel.sequence import token_share
from kiln.trainer.objectives.base import Objective
from kiln.trainer.objectives.mlm import EVAL_STEP, needs_encoder, select_positions


def generator_config(disc: ModelConfig, width: float) -> ModelConfig:
    """The generator's config: `width` of the discriminator's hidden size in whole heads of its
    head size (at least one), its kv-head ratio where it divides, dense, bidirectional."""
    heads = max(1, round(disc.n_heads * width))
    group = disc.n_heads // disc.kv_heads  # query heads per kv head
    kv = heads // group if heads % group == 0 and heads >= group else heads
    ffn = max(64, round(disc.ffn_dim * width / 64) * 64) if disc.ffn_dim else 0
    return dataclasses.replace(disc, dim=heads * disc.head_dim, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
                               mlp="swiglu", causal=False, tie_embeddings=True)


class Generator(nn.Module):
    """The MLM generator on the discriminator's embedding `shared` (see the module docstring).
    `shared` is not a submodule: the Parameter has one owner, the discriminator."""

    def __init__(self, cfg: ModelConfig, shared: nn.Embedding):
        super().__init__()
        self.cfg, d = cfg, shared.embedding_dim
        self.proj_in = nn.Linear(d, cfg.dim, bias=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj_out = nn.Linear(cfg.dim, d, bias=False)
        self.head = OutputHead(d, cfg.vocab_size, tied_to=shared)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():  # the discriminator's init (Transformer.reset_parameters)
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("wo.weight", "w2.weight")) else std)

    def forward(self, embedded, position_ids, doc_ids):
        """Hidden states [B, S, model.dim] (ready for the tied head) of the embedded inputs."""
        cos, sin = kernels.rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.proj_in(embedded)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids)
        return self.proj_out(self.norm(x))


class RTDHead(nn.Module):
    """Replaced-token detection: dense, GELU, one logit per token (ELECTRA's discriminator head)."""

    def __init__(self, dim: int, std: float):
        super().__init__()
        self.dense, self.out = nn.Linear(dim, dim), nn.Linear(dim, 1)
        for lin in (self.dense, self.out):
            nn.init.normal_(lin.weight, 0.0, std)
            nn.init.zeros_(lin.bias)

    def forward(self, hidden):
        return self.out(F.gelu(self.dense(hidden))).squeeze(-1)


def sample_tokens(logits: torch.Tensor, noise: torch.Tensor, never: int | None = None) -> torch.Tensor:
    """One token per row of `logits` [N, V] from its softmax, by inverse CDF at `noise` [N] in [0, 1)
    (detached: sampling passes no gradient); token `never` is never drawn."""
    logits = logits.detach().float()
    if never is not None:
        logits = logits.index_fill(-1, torch.tensor([never], device=logits.device), float("-inf"))
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    idx = torch.searchsorted(cdf, (noise.float() * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp(max=logits.shape[-1] - 1)


def rtd_labels(sampled_inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1.0 where the discriminator's input differs from the original token, else 0.0 (a sample
    equal to the original counts as original)."""
    return (sampled_inputs != targets).float()


class Electra(Objective):
    """ELECTRA (see the module docstring); `self.model` is the discriminator, `self.gen` the generator."""

    def __init__(self, model, mask_id: int, mask_ratio: float = 0.15, generator_width: float = 0.25,
                 disc_weight: float = 50.0, loss_group=None, seed: int = 0, rank: int = 0):
        super().__init__(model, loss_group=loss_group, seed=seed, rank=rank)
        self.mask_id, self.mask_ratio, self.disc_weight = mask_id, mask_ratio, disc_weight
        self.gen = Generator(generator_config(model.cfg, generator_width), model.embed)
        for mine, theirs in zip(self.gen.layers, model.layers):  # the discriminator's attention, e.g.
            mine.attn.attn_fn = theirs.attn.attn_fn             # sequence-parallel rings, for both
        self.rtd = RTDHead(model.cfg.dim, model.cfg.init_std)
        if model.head.weight is not None:  # an untied LM head takes no part in ELECTRA
            model.head.weight.requires_grad_(False)
        self.mask_rate = 0.0

    @classmethod
    def build(cls, model, cfg, *, loss_group=None, seed: int = 0, rank: int = 0, mask_id=None) -> "Electra":
        if mask_id is None:
            raise ValueError("ELECTRA needs the tokenizer's MASK id (kiln.data.tokenizer.MASK)")
        needs_encoder("electra", model)
        e = cfg.electra
        return cls(model, mask_id=mask_id, mask_ratio=e.mask_ratio, generator_width=e.generator_width,
                   disc_weight=e.disc_weight, loss_group=loss_group, seed=seed, rank=rank)

    def mask(self, ids: torch.Tensor, gen: torch.Generator) -> dict:
        """Generator inputs, MLM labels, original tokens and the sampling noise for `ids` [B, S]."""
        selected = select_positions(ids.shape, self.mask_ratio, gen)
        noise = torch.rand(ids.shape, generator=gen)
        return {"input_ids": ids.masked_fill(selected, self.mask_id), "labels": ids.masked_fill(~selected, -100),
                "targets": ids, "noise": noise}

    def prepare_batch(self, batch: dict, step: int) -> dict:
        out = self.mask(batch["input_ids"], self.generator(step))
        self.mask_rate = float((out["labels"] != -100).float().mean())
        return {**batch, **out}

    def loss(self, input_ids, labels, position_ids=None, doc_ids=None, targets=None, noise=None):
        if targets is None:  # a plain (evaluation) batch: the fixed evaluation draw
            out = self.mask(input_ids.cpu(), self.generator(EVAL_STEP))
            input_ids, labels, targets, noise = (out[k].to(input_ids.device)
                                                 for k in ("input_ids", "labels", "targets", "noise"))
        if position_ids is None:
            b, s = input_ids.shape
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        masked = labels != -100
        hidden = self.gen(self.model.embed(input_ids), position_ids, doc_ids)
        logits = self.gen.head(hidden[masked])  # [masked, V]: the head runs on masked rows only
        # a rank without a masked token (a tiny batch) adds nothing, rather than a NaN mean
        gen_loss = F.cross_entropy(logits.float(), labels[masked]) if len(logits) else logits.sum().float()
        sampled = targets.masked_scatter(masked, sample_tokens(logits, noise[masked], never=self.mask_id))
        replaced = rtd_labels(sampled, targets)
        disc_logits = self.rtd(self.model(sampled, position_ids=position_ids, doc_ids=doc_ids))
        rtd_loss = F.binary_cross_entropy_with_logits(disc_logits.float(), replaced)
        if self.loss_group is not None:  # each part's share of its mean over the group
            gen_loss = gen_loss * token_share(labels, self.loss_group).to(gen_loss.dtype)
            rtd_loss = rtd_loss * token_share(torch.zeros_like(targets), self.loss_group).to(rtd_loss.dtype)
        loss = gen_loss + self.disc_weight * rtd_loss
        metrics = {}
        if self.training:
            aux = moe_aux_loss(self.model)
            if aux is not None:
                loss = loss + aux.to(loss.dtype)
            with torch.no_grad():
                metrics = {"mask_rate": self.mask_rate, "gen_loss": gen_loss.detach(), "rtd_loss": rtd_loss.detach(),
                           "gen_mlm_acc": (logits.argmax(-1) == labels[masked]).float().mean(),
                           "disc_acc": ((disc_logits > 0).float() == replaced).float().mean(),
                           "replaced_frac": replaced.mean()}
        return loss, metrics

    def flops_per_token(self, seq_len: int) -> float:
        """Both models: the discriminator without its LM head plus the RTD head, the generator
        with its projections and its tied head on the masked positions only."""
        d, g = self.model.cfg, self.gen.cfg
        disc = 6 * (matmul_params(d) - d.dim * d.vocab_size + d.dim * d.dim + d.dim) + attention_flops(d, seq_len)
        gen_head = d.dim * g.vocab_size * self.mask_ratio
        gen = 6 * (matmul_params(g) - g.dim * g.vocab_size + 2 * d.dim * g.dim + gen_head) + attention_flops(g, seq_len)
        return disc + gen
