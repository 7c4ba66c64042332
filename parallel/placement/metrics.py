"""Quality measures and the modelled step time of an expert placement (MoETuner).

Cost model (per MoE layer, forward pass, as in MoETuner's serving setting):
  * compute: rank r runs its experts on the token-choices routed to them,
    ``load_on_rank * 2 * 3 * hidden * ffn_hidden / flops_per_s`` (SwiGLU expert: 3 matmuls).
  * communication into layer l (l >= 1): a token-choice at expert f of layer l needs the token's
    hidden vector (``hidden * bytes_per_elem`` bytes) from where the token was in layer l-1. With
    top-k routing the token sat on k experts; the transition counts hold all k*k pairs, so each
    pair carries 1/k of a vector. Pairs whose experts share a rank cost nothing; others are sent
    over NVLink-class intra-node links (``intra_bw``) or the inter-node network (``inter_bw``).
  * rank r's time in layer l = compute(r) + intra bytes r sends / intra_bw + inter bytes r sends /
    inter_bw (sends on the two link kinds are counted serially: a conservative bound). The layer
    takes the slowest rank's time; the step time is the sum over layers. Layer 0's dispatch comes
    from the attention ranks, which placement does not change, so layer 0 counts compute only.
The ILP's stage-2 cost of one layer pair is ``sum over rank pairs (r != r') of traffic/bandwidth``
plus ``max_pair_weight`` times the largest single rank-pair cost (the all-to-all tail).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from kiln.parallel.placement.io import PlacementError, RoutingProfile, check_placement


@dataclass
class Topology:
    """Expert-parallel ranks grouped into nodes of equal size (rank r is on node r // (R/nodes))."""

    ranks: int = field(default=8, metadata={"help": "expert-parallel ranks R"})
    nodes: int = field(default=1, metadata={"help": "nodes the R ranks span (R/nodes per node)"})

    def validate(self):
        if self.ranks < 1 or self.nodes < 1 or self.ranks % self.nodes:
            raise PlacementError(f"topology needs ranks >= 1 split evenly over nodes "
                                 f"(got ranks={self.ranks}, nodes={self.nodes}); pick nodes dividing ranks")

    def node_of(self) -> np.ndarray:
        """Node id of each rank, [R]."""
        self.validate()
        return np.arange(self.ranks) // (self.ranks // self.nodes)


@dataclass
class CostModel:
    """Hardware and model sizes for the modelled step time (defaults: Mixtral-8x7B-like, H100)."""

    hidden: int = field(default=4096, metadata={"help": "model hidden size (bytes sent per token)"})
    ffn_hidden: int = field(default=14336, metadata={"help": "expert FFN hidden size"})
    bytes_per_elem: int = field(default=2, metadata={"help": "activation bytes per element (bf16=2)"})
    flops_per_s: float = field(default=400e12, metadata={"help": "sustained expert FLOP/s per rank"})
    intra_bw: float = field(default=150e9, metadata={"help": "intra-node bytes/s one rank sends"})
    inter_bw: float = field(default=25e9, metadata={"help": "inter-node bytes/s one rank sends"})
    max_pair_weight: float = field(default=8.0, metadata={
        "help": "weight of the largest rank-pair cost in the ILP stage-2 objective"})

    def validate(self):
        if min(self.hidden, self.ffn_hidden, self.bytes_per_elem) < 1 or \
                min(self.flops_per_s, self.intra_bw, self.inter_bw) <= 0 or self.max_pair_weight < 0:
            raise PlacementError("cost model needs positive sizes, rates and bandwidths and "
                                 "max_pair_weight >= 0; fix the CostModel fields")

    @property
    def token_bytes(self) -> float:
        return float(self.hidden * self.bytes_per_elem)

    @property
    def s_per_token(self) -> float:
        """Compute seconds per token-choice on one expert."""
        return 6.0 * self.hidden * self.ffn_hidden / self.flops_per_s

    def link_s_per_pair(self, topo: Topology, top_k: int) -> np.ndarray:
        """[R, R] seconds per transition pair sent from rank r to rank r' (0 on the diagonal)."""
        node = topo.node_of()
        same_node = node[:, None] == node[None, :]
        w = np.where(same_node, 1.0 / self.intra_bw, 1.0 / self.inter_bw) * self.token_bytes / top_k
        np.fill_diagonal(w, 0.0)
        return w


def one_hot(assign: np.ndarray, R: int) -> np.ndarray:
    """[E] ids in [0, R) -> [E, R] 0/1 matrix."""
    m = np.zeros((assign.shape[0], R))
    m[np.arange(assign.shape[0]), assign] = 1.0
    return m


def rank_loads(profile: RoutingProfile, placement: np.ndarray, R: int) -> np.ndarray:
    """[L, R] token-choices each rank computes in each layer."""
    return np.stack([np.bincount(placement[l], weights=profile.load[l], minlength=R)
                     for l in range(profile.layers)])


def rank_traffic(profile: RoutingProfile, placement: np.ndarray, R: int) -> np.ndarray:
    """[L-1, R, R] transition pairs from rank r (layer l) to rank r' (layer l+1)."""
    L = profile.layers
    out = np.zeros((max(L - 1, 0), R, R))
    for l in range(L - 1):
        out[l] = one_hot(placement[l], R).T @ profile.transitions[l] @ one_hot(placement[l + 1], R)
    return out


def pair_cost(traffic: np.ndarray, link_s: np.ndarray, max_pair_weight: float) -> float:
    """Stage-2 cost of one layer pair: total traffic/bandwidth + weight * largest rank-pair cost."""
    c = traffic * link_s
    return float(c.sum() + max_pair_weight * c.max(initial=0.0))


@dataclass
class PlacementMetrics:
    """Predicted quality of a placement under a profile, topology and cost model."""

    balancedness: list            # [L] mean/max tokens per rank
    balancedness_mean: float
    balancedness_min: float
    cross_rank_fraction: float    # transition pairs whose consecutive experts sit on different ranks
    inter_node_fraction: float    # ... on different nodes
    layer_time_s: list            # [L] modelled time of each MoE layer
    step_time_s: float            # sum of layer_time_s
    comm_time_s: float            # communication part of the slowest ranks, summed over layers
    chain_cost_s: float           # the ILP stage-2 objective of this placement
    coselect_kept_fraction: float | None = None   # a token's choice pairs on one rank (None:
    #                                               the profile has no co-selection counts)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(profile: RoutingProfile, placement, topo: Topology,
             cost: CostModel | None = None) -> PlacementMetrics:
    """All metrics of ``placement`` ([L, E] rank ids) for ``profile`` on ``topo``."""
    cost = cost or CostModel()
    cost.validate()
    topo.validate()
    L, E, R = profile.layers, profile.experts, topo.ranks
    p = check_placement(placement, L, E, R)
    loads = rank_loads(profile, p, R)
    mx = loads.max(1)
    bal = np.where(mx > 0, loads.mean(1) / np.where(mx > 0, mx, 1), 1.0)
    traffic = rank_traffic(profile, p, R)
    node = topo.node_of()
    total = profile.transitions.sum()
    off_rank = traffic.sum() - np.trace(traffic, axis1=1, axis2=2).sum()
    same_node = (node[:, None] == node[None, :])
    off_node = traffic[:, ~same_node].sum()
    link = cost.link_s_per_pair(topo, profile.top_k)
    comp = loads * cost.s_per_token                                   # [L, R]
    comm = np.zeros((L, R))
    if L > 1:
        comm[1:] = (traffic * link[None]).sum(2)                      # sends of rank r into layer l
    per_rank = comp + comm
    slow = per_rank.argmax(1)
    layer_t = per_rank.max(1)
    chain = sum(pair_cost(traffic[l], link, cost.max_pair_weight) for l in range(L - 1))
    return PlacementMetrics(
        balancedness=bal.tolist(), balancedness_mean=float(bal.mean()),
        balancedness_min=float(bal.min()),
        cross_rank_fraction=float(off_rank / total) if total > 0 else 0.0,
        inter_node_fraction=float(off_node / total) if total > 0 else 0.0,
        layer_time_s=layer_t.tolist(), step_time_s=float(layer_t.sum()),
        comm_time_s=float(comm[np.arange(L), slow].sum()), chain_cost_s=float(chain),
        coselect_kept_fraction=coselect_kept_fraction(profile, p))


def coselect_kept_fraction(profile: RoutingProfile, placement: np.ndarray) -> float | None:
    """Share of the profile's co-selection pairs (two choices of one token in one layer) whose
    experts share a rank: what dedup dispatch saves (top_k = 2: rows sent per token and layer =
    2 - this share). None without co-selection counts or pairs (top_k = 1)."""
    C = profile.coselect
    if C is None or C.sum() <= 0:
        return None
    p = np.asarray(placement)
    same = p[:, :, None] == p[:, None, :]
    return float(C[same].sum() / C.sum())


def balance_objective(profile: RoutingProfile, placement: np.ndarray, R: int) -> float:
    """ILP stage-1 objective: sum over layers and ranks of |tokens on rank - mean| (token-choices)."""
    loads = rank_loads(profile, np.asarray(placement), R)
    return float(np.abs(loads - loads.mean(1, keepdims=True)).sum())


def chain_objective(profile: RoutingProfile, placement: np.ndarray, topo: Topology,
                    cost: CostModel | None = None) -> float:
    """ILP stage-2 objective (seconds): sum over layer pairs of ``pair_cost``."""
    cost = cost or CostModel()
    link = cost.link_s_per_pair(topo, profile.top_k)
    traffic = rank_traffic(profile, np.asarray(placement), topo.ranks)
    return float(sum(pair_cost(t, link, cost.max_pair_weight) for t in traffic))
