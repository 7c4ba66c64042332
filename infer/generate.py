"""Decoding: greedy or top-k / top-p sampling, with a KV cache, on a batch of prompts of
different lengths (left-padded, so every row's next token lands in the same column).

`generate(..., cache=False)` recomputes the whole sequence every step through the model's own
attention, with no padding: the reference a cached decode must reproduce token for token.
"""
from dataclasses import dataclass

import torch

from kiln.infer.errors import InferError
from kiln.infer.kv_cache import KVCache


@dataclass
class Sampling:
    """How the next token is chosen: greedy when temperature is 0, else sampled from the
    temperature-scaled distribution cut to the top_k tokens and the top_p probability mass."""

    temperature: float = 0.0
    top_k: int = 0          # 0 = no cut
    top_p: float = 1.0      # 1 = no cut
    seed: int = 0

    def check(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InferError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1 "
                             f"(got {self.temperature}, {self.top_k}, {self.top_p})")


def next_token(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def _check_prompts(prompts, vocab: int) -> None:
    if not prompts:
        raise InferError("no prompts to generate from: pass --prompt TEXT or a --prompts file with lines")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InferError(f"prompt {i} is empty: every prompt needs at least one token")
        if max(p) >= vocab or min(p) < 0:
            raise InferError(f"prompt {i} has token ids outside the model's vocabulary of {vocab}")


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new: int, sampling: Sampling | None = None,
             eot: int | None = None, cache: bool = True, on_step=None) -> list[list[int]]:
    """The `max_new` (or fewer, stopping at `eot`, which is not returned) tokens that follow each
    prompt. `on_step(ids, positions, valid)` runs before every forward (ExpertFlow's prefetch)."""
    sampling = sampling or Sampling()
    sampling.check()
    _check_prompts(prompts, model.cfg.vocab_size)
    if max_new < 1:
        raise InferError(f"max_new must be >= 1 (got {max_new})")
    if not cache:
        return [_generate_uncached(model, p, max_new, sampling, eot, on_step) for p in prompts]
    model.eval()
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature else None
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, width, dtype=torch.long, device=device)
    valid = torch.zeros(b, width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        valid[i, width - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    kv = KVCache(model.cfg, b, width + max_new, dtype=model.embed.weight.dtype, device=device)
    out = [[] for _ in prompts]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    with kv.attached(model):
        for _ in range(max_new):
            if on_step is not None:
                on_step(ids, positions, valid)
            kv.feed(positions, valid)
            hidden = model(ids, position_ids=positions)
            kv.advance()
            tok = next_token(model.logits(hidden[:, -1]), sampling, gen)
            for i in range(b):
                if not done[i]:
                    if eot is not None and int(tok[i]) == eot:
                        done[i] = True
                    else:
                        out[i].append(int(tok[i]))
            if bool(done.all()):
                break
            ids, positions = tok[:, None], positions[:, -1:] + 1
            valid = torch.ones(b, 1, dtype=torch.bool, device=device)
    return out


def _generate_uncached(model, prompt, max_new, sampling, eot, on_step):
    """One prompt, the whole sequence recomputed each step by the model's own attention."""
    model.eval()
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature else None
    seq = torch.tensor([prompt], device=device)
    out = []
    for _ in range(max_new):
        positions = torch.arange(seq.shape[1], device=device)[None]
        if on_step is not None:
            on_step(seq, positions, torch.ones_like(seq, dtype=torch.bool))
        tok = next_token(model.logits(model(seq)[:, -1]), sampling, gen)
        if eot is not None and int(tok[0]) == eot:
            break
        out.append(int(tok[0]))
        seq = torch.cat([seq, tok[:, None]], 1)
    return out
