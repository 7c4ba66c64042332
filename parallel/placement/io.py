"""Routing profiles, placement validity, and placement.json for MoETuner expert placement.

A *routing profile* records how tokens were routed through the MoE layers of a model on a
representative sample; a *placement* is an integer array ``[L, E]`` giving the expert-parallel
rank that holds expert ``e`` of MoE layer ``l``. This module holds the data types, the
independent validity checker, the synthetic profile generator and the file formats; the
solvers live in ``kiln.parallel.placement.strategies`` and its stages, and the metrics in
``kiln.parallel.placement.metrics``.

Counting convention (top-k routing, k >= 1):
  * ``load[l, e]`` counts token-choices: a token that picks experts {a, b} in layer l adds 1 to
    ``load[l, a]`` and 1 to ``load[l, b]``; so ``load[l].sum() == tokens * k``.
  * ``transitions[l, e, f]`` counts all k*k pairs of a token's choices in layers l and l+1: a token
    with choices {a, b} in layer l and {c, d} in layer l+1 adds 1 to each of T[l,a,c], T[l,a,d],
    T[l,b,c], T[l,b,d]; so ``transitions[l].sum() == tokens * k * k``. The row sums of T[l] are
    therefore ``k * load[l]`` and the column sums ``k * load[l+1]``.
  * ``coselect[l, e, f]`` (optional; profiles recorded before it have None) counts the ordered
    pairs of distinct choices of one token in layer l: a token with choices {a, b} adds 1 to
    C[l,a,b] and 1 to C[l,b,a]. C[l] is symmetric with a zero diagonal and
    ``coselect[l].sum() == tokens * k * (k - 1)``. Under dedup dispatch a token's choices that
    share a rank travel as one row, so these counts are what a training placement co-locates.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np


class PlacementError(ValueError):
    """A placement request, profile or placement file that cannot be used (one-line message)."""


@dataclass
class RoutingProfile:
    """Per-layer expert loads and consecutive-layer transition counts of a routed sample."""

    load: np.ndarray          # [L, E] token-choices routed to expert e of MoE layer l
    transitions: np.ndarray   # [L-1, E, E] token-choice pairs (e in layer l, f in layer l+1)
    tokens: int               # tokens in the sample
    top_k: int = 1            # experts per token (used only to check the counting convention)
    coselect: np.ndarray | None = None   # [L, E, E] pairs of one token's choices in one layer

    def __post_init__(self):
        self.load = np.asarray(self.load, dtype=np.float64)
        self.transitions = np.asarray(self.transitions, dtype=np.float64)
        self.tokens = int(self.tokens)
        self.top_k = int(self.top_k)
        if self.coselect is not None:
            self.coselect = np.asarray(self.coselect, dtype=np.float64)
        self.validate()

    @property
    def layers(self) -> int:
        return self.load.shape[0]

    @property
    def experts(self) -> int:
        return self.load.shape[1]

    def validate(self):
        """Raise PlacementError if shapes or counts are inconsistent."""
        if self.load.ndim != 2 or self.load.shape[0] < 1 or self.load.shape[1] < 1:
            raise PlacementError(f"routing profile load must be [L, E] with L, E >= 1 "
                                 f"(got shape {self.load.shape}); rebuild the profile")
        L, E = self.load.shape
        if self.transitions.shape != (max(L - 1, 0), E, E):
            raise PlacementError(f"routing profile transitions must be [L-1, E, E] = "
                                 f"{(max(L - 1, 0), E, E)} for load {self.load.shape} "
                                 f"(got {self.transitions.shape}); rebuild the profile")
        if not (np.isfinite(self.load).all() and np.isfinite(self.transitions).all()):
            raise PlacementError("routing profile holds NaN/inf counts; rebuild the profile")
        if (self.load < 0).any() or (self.transitions < 0).any():
            raise PlacementError("routing profile holds negative counts; rebuild the profile")
        if self.coselect is not None:
            c = self.coselect
            if c.shape != (L, E, E):
                raise PlacementError(f"routing profile coselect must be [L, E, E] = {(L, E, E)} "
                                     f"(got {c.shape}); rebuild the profile")
            if not np.isfinite(c).all() or (c < 0).any():
                raise PlacementError("routing profile holds NaN/inf or negative co-selection "
                                     "counts; rebuild the profile")
        if self.tokens < 1 or self.top_k < 1:
            raise PlacementError(f"routing profile needs tokens >= 1 and top_k >= 1 "
                                 f"(got tokens={self.tokens}, top_k={self.top_k})")

    def digest(self) -> str:
        """Short content hash, written into placement.json to tie a placement to its profile."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.load, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.transitions, dtype=np.float64).tobytes())
        h.update(f"{self.tokens},{self.top_k}".encode())
        if self.coselect is not None:  # absent: the digest of a profile recorded before it
            h.update(np.ascontiguousarray(self.coselect, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str):
        """Write the profile to an .npz file (parent folder must exist)."""
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise PlacementError(f"cannot save routing profile: folder {parent} does not exist; "
                                 f"create it first")
        with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz'
            extra = {} if self.coselect is None else {"coselect": self.coselect}
            np.savez(f, load=self.load, transitions=self.transitions,
                     tokens=np.int64(self.tokens), top_k=np.int64(self.top_k),
                     format=np.array("kiln-routing-profile-v1"), **extra)

def _load_profile(cls, path: str) -> "RoutingProfile":
    """Read a profile written by ``save``; one-line PlacementError if missing or corrupt."""
    if not os.path.isfile(path):
        raise PlacementError(f"routing profile {path} not found; record one with the routing "
                             f"profiler or pass the right --profile path")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"load", "transitions", "tokens"} - set(z.files)
            if missing:
                raise PlacementError(f"routing profile {path} lacks {sorted(missing)}; "
                                     f"it is not a kiln routing profile, re-record it")
            top_k = int(z["top_k"]) if "top_k" in z.files else 1
            coselect = z["coselect"] if "coselect" in z.files else None  # older profiles: none
            return cls(load=z["load"], transitions=z["transitions"],
                       tokens=int(z["tokens"]), top_k=top_k, coselect=coselect)
    except PlacementError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError) as e:
        raise PlacementError(f"routing profile {path} is corrupt or not an .npz "
                             f"({type(e).__name__}); re-record it") from None


# `load` is both the [L, E] field (on instances) and the reader (on the class): the classmethod is
# attached after the dataclass is built so the field keeps no default; an instance's own `load`
# attribute shadows this non-data descriptor, so `RoutingProfile.load(path)` and `prof.load` both work.
RoutingProfile.load = classmethod(_load_profile)


def synthetic_profile(L: int = 16, E: int = 64, top_k: int = 2, tokens: int = 20000,
                      zipf_a: float = 1.0, correlation: float = 0.5,
                      seed: int = 0, together: float = 0.0, group: int = 4) -> RoutingProfile:
    """Sample token routes with Zipf-skewed popularity and cross-layer correlated routes.

    Each layer gets a Zipf(``zipf_a``) popularity over a random permutation of its experts, and
    each layer pair a random *partner* map e -> partner(e). A token picks k distinct experts in
    layer 0 from the popularity; in layer l+1 each of its choices e moves to partner(e) with
    probability ``correlation`` (if not already taken), else it samples from layer l+1's
    popularity. With ``together`` > 0 each layer's experts also fall into random groups of
    ``group`` (experts often chosen together, as routers learn): a token's later choices come from
    its first choice's group with probability ``together`` (by popularity within the group).
    Loads, transitions and co-selection counts come from the same sampled routes, so they agree.
    """
    if not (L >= 1 and E >= 1 and 1 <= top_k <= E and tokens >= 1):
        raise PlacementError(f"synthetic_profile needs L, E, tokens >= 1 and 1 <= top_k <= E "
                             f"(got L={L}, E={E}, top_k={top_k}, tokens={tokens})")
    if not (0.0 <= together <= 1.0) or group < 1:
        raise PlacementError(f"synthetic_profile needs 0 <= together <= 1 and group >= 1 "
                             f"(got together={together}, group={group})")
    if not (0.0 <= correlation <= 1.0) or zipf_a < 0:
        raise PlacementError(f"synthetic_profile needs 0 <= correlation <= 1 and zipf_a >= 0 "
                             f"(got correlation={correlation}, zipf_a={zipf_a})")
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, E + 1, dtype=np.float64) ** (-zipf_a)
    logp = np.empty((L, E))
    for l in range(L):
        logp[l, rng.permutation(E)] = np.log(ranks / ranks.sum())
    partner = np.stack([rng.permutation(E) for _ in range(max(L - 1, 0))]) if L > 1 else None
    rows = np.arange(tokens)

    def pick(l, taken):
        # Gumbel-max over the popularity, excluding experts this token already holds.
        g = logp[l][None, :] - np.log(-np.log(rng.random((tokens, E))))
        g[taken] = -np.inf
        return g.argmax(1)

    # groups drawn after everything above, so together=0 keeps the older profiles' random stream
    groups = np.stack([rng.permutation(E) // group for _ in range(L)]) if together > 0 else None
    choices = np.empty((L, tokens, top_k), dtype=np.int64)
    for l in range(L):
        taken = np.zeros((tokens, E), dtype=bool)
        for j in range(top_k):
            c = pick(l, taken)
            if groups is not None and j > 0:
                outside = groups[l][None, :] != groups[l][choices[l, :, 0]][:, None]
                inner = pick(l, taken | outside)           # -inf everywhere: the group is used up
                ok = (rng.random(tokens) < together) & ~(taken | outside).all(1)
                c = np.where(ok, inner, c)
            if l > 0:
                follow = rng.random(tokens) < correlation
                p = partner[l - 1][choices[l - 1, :, j]]
                follow &= ~taken[rows, p]
                c = np.where(follow, p, c)
            choices[l, :, j] = c
            taken[rows, c] = True
    load = np.stack([np.bincount(choices[l].ravel(), minlength=E) for l in range(L)]).astype(float)
    trans = np.zeros((max(L - 1, 0), E, E))
    for l in range(L - 1):
        pairs = choices[l][:, :, None] * E + choices[l + 1][:, None, :]
        trans[l] = np.bincount(pairs.ravel(), minlength=E * E).reshape(E, E)
    co = np.zeros((L, E, E))
    for l in range(L):
        pairs = choices[l][:, :, None] * E + choices[l][:, None, :]
        co[l] = np.bincount(pairs.ravel(), minlength=E * E).reshape(E, E)
        np.fill_diagonal(co[l], 0.0)                               # a choice with itself
    return RoutingProfile(load=load, transitions=trans, tokens=tokens, top_k=top_k, coselect=co)


def check_placement(placement, L: int, E: int, R: int, max_per_rank_layer: int | None = None,
                    what: str = "placement") -> np.ndarray:
    """Independent validity check; returns the placement as int64 [L, E] or raises PlacementError.

    Valid means: shape [L, E]; every entry an integer rank in [0, R); every rank holds exactly
    L*E/R experts over the whole model (memory balance); and, if given, no rank holds more than
    ``max_per_rank_layer`` experts of one layer.
    """
    p = np.asarray(placement)
    if p.shape != (L, E):
        raise PlacementError(f"{what} has shape {p.shape} but the model needs [L, E] = {(L, E)}; "
                             f"recompute the placement for this model")
    if p.size and not np.issubdtype(p.dtype, np.integer):
        if not np.all(np.isfinite(p)) or not np.all(p == np.round(p)):
            raise PlacementError(f"{what} holds non-integer rank ids; recompute the placement")
    p = p.astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= R):
        raise PlacementError(f"{what} uses rank ids outside [0, {R}) "
                             f"(min {p.min()}, max {p.max()}); recompute it for {R} ranks")
    if (L * E) % R:
        raise PlacementError(f"memory balance impossible: L*E = {L * E} experts do not divide "
                             f"over {R} ranks; pick an expert-parallel size dividing {L * E}")
    held = np.bincount(p.ravel(), minlength=R)
    if (held != L * E // R).any():
        raise PlacementError(f"{what} is not memory balanced: ranks hold {held.tolist()} experts, "
                             f"each must hold {L * E // R}")
    if max_per_rank_layer is not None:
        per_layer = np.stack([np.bincount(row, minlength=R) for row in p])
        if per_layer.max() > max_per_rank_layer:
            l, r = np.unravel_index(per_layer.argmax(), per_layer.shape)
            raise PlacementError(f"{what} puts {per_layer[l, r]} experts of layer {l} on rank {r}, "
                                 f"above max_per_rank_layer={max_per_rank_layer}")
    return p


@dataclass
class PlacementResult:
    """A placement with its predicted metrics and how it was found."""

    placement: np.ndarray                 # [L, E] int64 rank ids
    strategy: str
    ranks: int
    nodes: int = 1
    metrics: dict = field(default_factory=dict)   # PlacementMetrics.to_dict()
    solver: dict = field(default_factory=dict)    # gap, solve_time_s, status, objectives ...
    profile_hash: str = ""

    def to_json(self, path: str | None = None) -> str:
        """Serialise to placement.json text (and write it to ``path`` if given)."""
        doc = {"format": "kiln-placement-v1", "strategy": self.strategy,
               "layers": int(self.placement.shape[0]), "experts": int(self.placement.shape[1]),
               "ranks": int(self.ranks), "nodes": int(self.nodes),
               "profile_hash": self.profile_hash, "solver": self.solver, "metrics": self.metrics,
               "placement": np.asarray(self.placement).astype(int).tolist()}
        text = json.dumps(doc, indent=1, default=_jsonable)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, path: str, L: int | None = None, E: int | None = None,
                  R: int | None = None) -> "PlacementResult":
        """Read placement.json and validate it (against L, E, R when given)."""
        if not os.path.isfile(path):
            raise PlacementError(f"placement file {path} not found; run the placement solver "
                                 f"(kiln.parallel.placement.place or bench/placement.py) first")
        try:
            with open(path) as f:
                doc = json.load(f)
            p = np.asarray(doc["placement"])
            ranks, nodes = int(doc["ranks"]), int(doc.get("nodes", 1))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlacementError(f"placement file {path} is corrupt ({type(e).__name__}); "
                                 f"regenerate it") from None
        if p.ndim != 2:
            raise PlacementError(f"placement file {path} holds a {p.ndim}-d placement, expected "
                                 f"[L, E]; regenerate it")
        if R is not None and R != ranks:
            raise PlacementError(f"placement file {path} is for {ranks} ranks but this run has "
                                 f"{R} expert-parallel ranks; recompute the placement")
        p = check_placement(p, L if L is not None else p.shape[0],
                            E if E is not None else p.shape[1], ranks, what=f"placement file {path}")
        return cls(placement=p, strategy=str(doc.get("strategy", "?")), ranks=ranks, nodes=nodes,
                   metrics=doc.get("metrics", {}), solver=doc.get("solver", {}),
                   profile_hash=str(doc.get("profile_hash", "")))


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")
