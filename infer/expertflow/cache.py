"""The fast tier: a fixed number of expert slots per MoE layer, in LRU order, with the counts
that ExpertFlow is judged by.

`need(layer, experts)` is one layer's forward asking for the experts its tokens chose: each one
already resident is a hit; the rest are misses, loaded on demand (`load`). `prefetch` loads
predicted experts before the forward; a prefetched expert is counted as a hit when it is used.
Eviction takes the least recently used slot whose expert the current forward does not hold.
"""
import collections
import threading
from dataclasses import dataclass, field

import torch

from kiln.infer.expertflow.store import WEIGHTS, ExpertStore


@dataclass
class CacheStats:
    """What the cache did, summed over every layer and forward."""

    hits: int = 0               # activated experts found resident (prefetched or kept)
    misses: int = 0             # activated experts loaded on demand
    prefetched: int = 0         # experts loaded ahead of a forward
    prefetch_unused: int = 0    # prefetched, then evicted before any use
    loads: int = 0              # experts copied into the fast tier (prefetched + misses)
    bytes_moved: int = 0
    forwards: int = 0           # (forward, layer) pairs
    activated: int = 0          # activated experts summed over (forward, layer)
    tokens: int = 0             # tokens fed through the model (counted once per forward)
    per_forward: list = field(default_factory=list)  # activated experts of each (forward, layer)

    def to_dict(self) -> dict:
        used = self.hits + self.misses
        d = {k: v for k, v in self.__dict__.items() if k != "per_forward"}
        d.update(hit_rate=self.hits / used if used else float("nan"),
                 loads_per_token=self.loads / self.tokens if self.tokens else float("nan"),
                 misses_per_token=self.misses / self.tokens if self.tokens else float("nan"),
                 bytes_per_token=self.bytes_moved / self.tokens if self.tokens else float("nan"),
                 activated_per_batch=self.activated / self.forwards if self.forwards else float("nan"))
        return d


class ExpertCache:
    """`slots` fast-tier slots for each MoE layer of `store`, on `store.device`."""

    def __init__(self, store: ExpertStore, slots: int):
        if not 1 <= slots <= store.experts:
            raise ValueError(f"the expert cache needs 1 to {store.experts} slots per layer (got {slots})")
        self.store, self.slots = store, slots
        self.tensors = [{w: torch.empty((slots,) + store.shapes[w][1:], dtype=store.dtype, device=store.device)
                         for w in WEIGHTS} for _ in range(store.layers)]
        self.lru = [collections.OrderedDict() for _ in range(store.layers)]  # expert -> slot, oldest first
        self.unused = [set() for _ in range(store.layers)]                   # prefetched, not yet used
        self.stats = CacheStats()
        self.trace = [[] for _ in range(store.layers)]  # per layer: the expert set of each forward
        self.lock = threading.Lock()  # the loader threads and the compute thread share lru
        self.ready = [threading.Event() for _ in range(store.layers)]  # layer's prefetch finished
        for e in self.ready:
            e.set()
        self.stream = torch.cuda.Stream() if store.device.type == "cuda" else None

    @property
    def fast_bytes(self) -> int:
        """Bytes of the fast-tier slots (every layer)."""
        return self.store.layers * self.slots * self.store.bytes_per_expert

    def resident(self, layer: int) -> set:
        return set(self.lru[layer])

    def slot(self, layer: int, expert: int) -> int:
        """The slot holding a resident expert; marks it most recently used."""
        with self.lock:
            self.lru[layer].move_to_end(expert)
            return self.lru[layer][expert]

    def load(self, layer: int, expert: int, keep: set) -> int:
        """Copy `expert` into a slot, evicting the least recently used expert not in `keep`."""
        with self.lock:
            lru = self.lru[layer]
            if expert in lru:
                lru.move_to_end(expert)
                return lru[expert]
            if len(lru) < self.slots:
                slot = len(lru)
            else:
                victim = next((e for e in lru if e not in keep), None)
                if victim is None:
                    raise RuntimeError(f"layer {layer}: all {self.slots} slots hold experts in use")
                slot = lru.pop(victim)
                if victim in self.unused[layer]:
                    self.unused[layer].discard(victim)
                    self.stats.prefetch_unused += 1
            lru[expert] = slot
            self.stats.loads += 1
            self.stats.bytes_moved += self.store.bytes_per_expert
        self.store.read_into(layer, expert, self.tensors[layer], slot, self.stream)
        return slot

    def prefetch(self, layer: int, experts: list) -> None:
        """Load up to `slots` of `experts` (most wanted first) ahead of a forward."""
        want = list(experts)[: self.slots]
        keep = set(want)
        for e in want:
            if e not in self.lru[layer]:
                self.load(layer, e, keep)
                self.stats.prefetched += 1
                self.unused[layer].add(e)

    def prefetch_async(self, wanted: list[list]) -> threading.Thread:
        """Prefetch `wanted[layer]` for every layer in a background thread, layer 0 first, so a
        later layer's copies overlap the compute of the earlier ones; each layer's forward waits
        for its own (`ready`)."""
        for e in self.ready:
            e.clear()

        def work():
            try:
                for layer, experts in enumerate(wanted):
                    self.prefetch(layer, experts)
                    self.sync()
                    self.ready[layer].set()
            finally:
                for e in self.ready:
                    e.set()
        t = threading.Thread(target=work, daemon=True)
        t.start()
        return t

    def mark_used(self, layer: int, experts) -> None:
        self.unused[layer].difference_update(experts)

    def sync(self) -> None:
        """Wait for this cache's copies (CUDA side stream); CPU copies are synchronous."""
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
