"""Communication accounting for the sequence-parallel attention algorithms.

Every point-to-point send made by TokenRing or Ring Attention is recorded here, by phase
("fwd" / "bwd" pass) and by ring direction:
  "forward"  = towards higher ranks (r -> r+1, or r -> r+s for a direct return to an owner),
  "backward" = towards lower ranks (r -> r-1).
The closed forms below are the exact totals over all ranks of one call; docs/tokenring.md
derives them and tests/parallel/test_tokenring.py checks the counters against them.

Ulysses' all-to-alls are counted by the same two directions: the chunk a rank sends to a
higher rank is "forward", to a lower rank "backward" (its own chunk stays and is not counted).
Under activation checkpointing a block's forward runs again inside the backward pass; its
messages are really sent again, then, and `recomputing()` files them under "bwd".
"""
from collections import defaultdict
from contextlib import contextmanager

FORWARD, BACKWARD = "forward", "backward"
PHASES, DIRECTIONS = ("fwd", "bwd"), (FORWARD, BACKWARD)


class CommStats:
    """Byte and message counters per (phase, direction); one per process (`COMM_STATS`)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        self._bytes = defaultdict(int)
        self._messages = defaultdict(int)
        self.wait_s = 0.0  # host time blocked in Exchange.wait (exposed communication)
        self._recompute_depth = 0

    @contextmanager
    def recomputing(self):
        """While active, forward-pass messages count as backward-pass ones (they are sent
        during the backward, by a checkpointed forward being recomputed)."""
        self._recompute_depth += 1
        try:
            yield
        finally:
            self._recompute_depth -= 1

    @property
    def replaying(self) -> bool:
        """True inside a checkpointed forward's replay (for counters that must not count twice)."""
        return self._recompute_depth > 0

    def record(self, phase: str, direction: str, nbytes: int) -> None:
        """Count one message of `nbytes` sent in `phase` towards `direction`."""
        if phase not in PHASES or direction not in DIRECTIONS:
            raise ValueError(f"unknown phase/direction {phase!r}/{direction!r}")
        if self._recompute_depth and phase == "fwd":
            phase = "bwd"
        self._bytes[phase, direction] += int(nbytes)
        self._messages[phase, direction] += 1

    def snapshot(self) -> dict:
        """{"fwd": {"forward": bytes, "backward": bytes}, "bwd": {...}, "messages": {...}, "wait_s": s}."""
        snap = {p: {d: self._bytes[p, d] for d in DIRECTIONS} for p in PHASES}
        snap["messages"] = {p: {d: self._messages[p, d] for d in DIRECTIONS} for p in PHASES}
        snap["wait_s"] = self.wait_s
        return snap


COMM_STATS = CommStats()


def moved_tokens(world: int, s_local: int, causal: bool) -> int:
    """Tokens' worth of a travelling tensor summed over all hops of one ring pass (all ranks).

    Each of the N shards makes N-1 hops. With zigzag causal masking a shard is sent whole to
    the ranks that need all of it, then only its second (Q) / first (K,V) half to the rest:
    half the hops carry half, so the total is 3/4 of N(N-1) full shards.
    """
    full = world * (world - 1) * s_local
    return full * 3 // 4 if causal and world > 1 else full


def expected_bytes(impl: str, *, world: int, batch: int, s_local: int, hq: int, hkv: int,
                   head_dim: int, itemsize: int, acc_itemsize: int, causal: bool,
                   doc_itemsize: int = 0) -> dict:
    """Exact bytes sent by all ranks in one forward + backward call: {phase: {direction: n}}.

    itemsize: bytes per element of q/k/v (and of the block output); acc_itemsize: of lse,
    delta and gradient partials (4, or 8 for float64 inputs); doc_itemsize: of doc ids when
    they are given (they travel with Q in TokenRing and with K/V in Ring), else 0.
    """
    if world < 2:
        return {p: {d: 0 for d in DIRECTIONS} for p in PHASES}
    t = moved_tokens(world, s_local, causal) * batch
    d, e, f, i = head_dim, itemsize, acc_itemsize, doc_itemsize
    if impl == "tokenring":
        # Q (+ doc ids) one way; block out (q dtype) + lse (acc dtype) back to Q's owner.
        # Backward: Q, dO, lse, delta (+ doc ids) travel; the partial dQ returns.
        return {"fwd": {BACKWARD: t * (hq * d * e + i), FORWARD: t * hq * (d * e + f)},
                "bwd": {BACKWARD: t * (hq * (2 * d * e + 2 * f) + i), FORWARD: t * hq * d * f}}
    if impl == "ulysses":
        # Contiguous shards; each of the N ranks keeps 1/N of every all-to-all and sends the
        # rest, half of it (summed over ranks) each way. Forward: q, k, v, then the output
        # (q-sized); backward: dout, then dq, dk, dv. Doc ids are all-gathered once per call.
        s = world * s_local
        per = batch * s * (2 * hq + 2 * hkv) * d * e * (world - 1) // world  # all ranks
        docs = world * (world - 1) * batch * s_local * i
        return {"fwd": {FORWARD: (per + docs) // 2, BACKWARD: (per + docs) // 2},
                "bwd": {FORWARD: per // 2, BACKWARD: per // 2}}
    if impl == "ring":
        # K, V (+ doc ids) travel; backward adds full dK/dV accumulators on N-1 hops per shard.
        kv = t * (2 * hkv * d * e + i)
        acc = world * (world - 1) * s_local * batch * 2 * hkv * d * f
        return {"fwd": {BACKWARD: kv, FORWARD: 0}, "bwd": {BACKWARD: kv + acc, FORWARD: 0}}
    raise ValueError(f"unknown sequence-parallel impl {impl!r}; use 'tokenring', 'ring' or 'ulysses'")
