"""ExpertFlow at serving time: an offloaded model, its expert cache and (optionally) the routing
predictor, driven by the generate / evaluate loops through one callback, `before(ids, ...)`.

Before each forward the predictor reads every row's tokens so far and names the experts each
new token will use in every layer; the cache prefetches them, most-voted first, up to its
slots, in a background thread that runs ahead of the forward layer by layer. What it missed is
loaded on demand inside the forward (kiln.infer.expertflow.offload).
Without a predictor this is plain LRU on-demand loading.
"""
from pathlib import Path

import numpy as np
import torch

from kiln.infer.expertflow.cache import ExpertCache
from kiln.infer.expertflow.offload import fast_tier_bytes, offload
from kiln.infer.expertflow.scheduler import in_order, schedule
from kiln.infer.expertflow.store import ExpertStore


class ExpertFlow:
    """`model` served from `cache`, prefetching with `predictor` when given."""

    def __init__(self, model, cache: ExpertCache, predictor=None):
        self.model, self.cache, self.predictor = model, cache, predictor
        self.history = None   # (ids, positions, valid) of every row so far
        self._prefetching = None
        offload(model, cache)

    @classmethod
    def build(cls, model, store_path: Path, slots: int, predictor=None, device="cpu") -> "ExpertFlow":
        """Write the model's experts to `store_path` (if not there) and serve it with `slots` per layer."""
        store_path = Path(store_path)
        if not store_path.is_file():
            ExpertStore.write(model, store_path)
        return cls(model, ExpertCache(ExpertStore(store_path, device), slots), predictor)

    def before(self, ids, positions, valid) -> None:
        """Called before each forward with the tokens about to be fed (the generate/eval hook)."""
        self.cache.stats.tokens += int(valid.sum())
        if ids.shape[1] > 1 or self.history is None or self.history[0].shape[0] != ids.shape[0]:
            self.history = (ids, positions, valid)           # a new prompt batch (prefill)
        else:
            h = self.history
            self.history = (torch.cat([h[0], ids], 1), torch.cat([h[1], positions], 1), torch.cat([h[2], valid], 1))
        if self.predictor is None:
            return
        all_ids, all_pos, all_valid = self.history
        top = self.predictor.predict(all_ids, position_ids=all_pos, doc_ids=all_valid.long())
        top = top[:, -ids.shape[1]:][valid]                     # [tokens, L, k] of the fed real tokens
        e = self.cache.store.experts
        wanted = []
        for layer in range(self.cache.store.layers):
            votes = torch.bincount(top[:, layer].reshape(-1), minlength=e)
            wanted.append([int(x) for x in votes.argsort(descending=True, stable=True) if votes[x] > 0])
        if self._prefetching is not None:
            self._prefetching.join()
        self._prefetching = self.cache.prefetch_async(wanted)

    def fast_bytes(self) -> int:
        """Fast-tier bytes: the model's resident weights plus the expert slots."""
        return fast_tier_bytes(self.model, self.cache)

    def route_patterns(self, prompts: list[list[int]]) -> np.ndarray:
        """Each prompt's predicted (layer, expert) usage as a 0/1 vector: the scheduler's input."""
        out = []
        for p in prompts:
            top = self.predictor.predict(torch.tensor([p]))[0]          # [S, L, k]
            hot = torch.zeros(top.shape[1], self.cache.store.experts, dtype=torch.bool)
            for layer in range(top.shape[1]):
                hot[layer, top[:, layer].reshape(-1)] = True
            out.append(hot.reshape(-1).numpy())
        return np.stack(out)

    def metrics(self) -> dict:
        """The cache's counts plus the fast-tier memory."""
        return {**self.cache.stats.to_dict(), "fast_tier_bytes": self.fast_bytes(), "slots": self.cache.slots}


def run_batches(prompts: list, batch_size: int, run, flow: ExpertFlow | None = None, scheduled: bool = False):
    """`run(batch_of_prompts) -> outputs` over `prompts` in batches of `batch_size`: in input order,
    or grouped by predicted route (flow's predictor) when `scheduled`. Outputs in input order."""
    if scheduled and flow is not None and flow.predictor is not None:
        batches = schedule(flow.route_patterns(prompts), batch_size)
    else:
        batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    outputs = [run([prompts[i] for i in b]) for b in batches]
    return in_order(batches, outputs)
