"""ExpertFlow's routing-path predictor: from the input tokens alone, every token's experts in
every MoE layer at once (multi-label, BCE), trained on routes recorded from the real model.

The predictor is a small causal kiln Transformer (routes depend on context, not only on the
token) with one linear head to layers x experts logits. A token's predicted set in a layer is
its top-k logits (k = the MoE's top_k); a batch's is the union over its tokens, which is what
a prefetch loads. Both are scored against a per-layer frequency baseline.
"""
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.infer.errors import InferError
from kiln.infer.expertflow.store import moe_blocks
from kiln.model import ModelConfig, Transformer

FILE, MANIFEST = "predictor.pt", "predictor.json"


@torch.no_grad()
def record_routes(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, S], routes [N, S, L, k]) of `model` over `batches` (each with input_ids)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise InferError("the checkpoint is a dense model: ExpertFlow needs an MoE checkpoint (model.mlp=moe)")
    seen = [None] * len(blocks)
    hooks = [b.router.register_forward_hook(lambda m, i, o, l=l: seen.__setitem__(l, o[0]))
             for l, b in enumerate(blocks)]
    tokens, routes = [], []
    try:
        model.eval()
        for b in batches:
            ids = b["input_ids"]
            model(ids, position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids"))
            routes.append(torch.stack([s.view(*ids.shape, -1) for s in seen], dim=2))
            tokens.append(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(tokens), torch.cat(routes)


@dataclasses.dataclass
class PredictorConfig:
    """Shape of the predictor and of the routes it predicts."""

    vocab_size: int
    layers: int
    experts: int
    top_k: int
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4


class RoutePredictor(nn.Module):
    """tokens [B, S] -> route logits [B, S, layers, experts]."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.body = Transformer(ModelConfig(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers,
                                            n_heads=cfg.n_heads))
        self.out = nn.Linear(cfg.dim, cfg.layers * cfg.experts)

    def forward(self, ids, position_ids=None, doc_ids=None):
        h = self.body(ids, position_ids=position_ids, doc_ids=doc_ids)
        return self.out(h).view(*ids.shape, self.cfg.layers, self.cfg.experts)

    @torch.no_grad()
    def predict(self, ids, position_ids=None, doc_ids=None) -> torch.Tensor:
        """Top-k experts [B, S, layers, k] of every token."""
        return self(ids, position_ids, doc_ids).topk(self.cfg.top_k, dim=-1).indices


def multi_hot(routes: torch.Tensor, experts: int) -> torch.Tensor:
    """[..., k] expert ids -> [..., experts] 0/1 (capacity-dropped ids == experts are ignored)."""
    hot = torch.zeros(*routes.shape[:-1], experts + 1)
    hot.scatter_(-1, routes.long(), 1.0)
    return hot[..., :experts]


def train_predictor(tokens, routes, cfg: PredictorConfig, steps: int = 300, batch: int = 16,
                    lr: float = 3e-3, seed: int = 0, log=None) -> RoutePredictor:
    """Fit a RoutePredictor to recorded (tokens, routes) with BCE; deterministic from `seed`."""
    torch.manual_seed(seed)
    pred = RoutePredictor(cfg)
    opt = torch.optim.AdamW(pred.parameters(), lr=lr, weight_decay=0.0)
    target = multi_hot(routes, cfg.experts)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(0, tokens.shape[0], (batch,), generator=g)
        loss = F.binary_cross_entropy_with_logits(pred(tokens[rows]), target[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step + 1) % max(steps // 5, 1) == 0:
            log(f"  predictor step {step + 1}/{steps}: bce {loss.item():.4f}")
    return pred.eval()


def _set_scores(pred_hot: torch.Tensor, true_hot: torch.Tensor) -> tuple[float, float]:
    """Micro-averaged precision and recall of predicted against true sets (0/1 tensors)."""
    both = float((pred_hot * true_hot).sum())
    return both / max(float(pred_hot.sum()), 1.0), both / max(float(true_hot.sum()), 1.0)


@torch.no_grad()
def route_metrics(predictor: RoutePredictor, tokens, routes, freq: torch.Tensor, batch_tokens: int = 8) -> dict:
    """Scores of `predictor` on held-out (tokens, routes), beside the frequency baseline `freq`
    [layers, experts] (training-route counts):
      token/*: each token's top-k set (precision = recall, as both sets hold k), per layer;
      batch/*: the union over groups of `batch_tokens` tokens drawn across sequences (one decode
               step of that batch size: what a prefetch loads), with the baseline given the same
               number of experts per layer (that layer's most frequent)."""
    cfg = predictor.cfg
    top = torch.cat([predictor.predict(tokens[i:i + 32]) for i in range(0, tokens.shape[0], 32)])
    true_hot, pred_hot = multi_hot(routes, cfg.experts), multi_hot(top, cfg.experts)
    base_sets = freq.topk(cfg.top_k, dim=-1).indices                         # [L, k]
    base_hot = multi_hot(base_sets, cfg.experts).expand_as(true_hot)
    out = {"token/accuracy": _set_scores(pred_hot, true_hot)[0],
           "token/baseline_accuracy": _set_scores(base_hot, true_hot)[0]}
    for l in range(cfg.layers):
        out[f"token/accuracy_l{l}"] = _set_scores(pred_hot[:, :, l], true_hot[:, :, l])[0]
        out[f"token/baseline_accuracy_l{l}"] = _set_scores(base_hot[:, :, l], true_hot[:, :, l])[0]
    flat_p, flat_t = pred_hot.reshape(-1, cfg.layers, cfg.experts), true_hot.reshape(-1, cfg.layers, cfg.experts)
    n = flat_p.shape[0] // batch_tokens * batch_tokens
    if n:
        order = torch.randperm(flat_p.shape[0], generator=torch.Generator().manual_seed(0))[:n]

        def union(hot):  # [groups, L, E]: the experts a forward over batch_tokens tokens needs
            return hot[order].reshape(n // batch_tokens, batch_tokens, cfg.layers, cfg.experts).amax(1)
        pu, tu = union(flat_p), union(flat_t)
        by_freq = freq.argsort(dim=-1, descending=True)                      # [L, E]
        ranks = torch.empty_like(by_freq).scatter_(-1, by_freq, torch.arange(cfg.experts).expand_as(by_freq))
        bu = (ranks[None] < pu.sum(-1, keepdim=True)).float()              # same budget, by frequency
        out["batch/precision"], out["batch/recall"] = _set_scores(pu, tu)
        out["batch/baseline_precision"], out["batch/baseline_recall"] = _set_scores(bu, tu)
        out["batch/tokens"] = batch_tokens
    return out


def save_predictor(predictor: RoutePredictor, folder: Path, meta: dict) -> Path:
    """predictor.pt (tensors only) and predictor.json (config, checksum, `meta`) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (FILE + ".tmp")
    torch.save(predictor.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.replace(folder / FILE)
    manifest = {"config": dataclasses.asdict(predictor.cfg), "files": {FILE: {"sha256": digest}}, **meta}
    (folder / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
    (folder / (MANIFEST + ".tmp")).replace(folder / MANIFEST)
    return folder / MANIFEST


def load_predictor(folder: Path) -> RoutePredictor:
    """A predictor saved by save_predictor, checked against its manifest (never unpickles code)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / FILE).is_file():
        raise InferError(f"no routing predictor in {folder}: run `kiln expertflow train-predictor CKPT` first, "
                         "or pass --no-predictor")
    manifest = json.loads((folder / MANIFEST).read_text())
    if hashlib.sha256((folder / FILE).read_bytes()).hexdigest() != manifest["files"][FILE]["sha256"]:
        raise InferError(f"{folder / FILE} does not match its manifest's checksum: retrain it with "
                         "`kiln expertflow train-predictor CKPT`")
    pred = RoutePredictor(PredictorConfig(**manifest["config"]))
    pred.load_state_dict(torch.load(folder / FILE, map_location="cpu", weights_only=True))
    return pred.eval()


def frequency(routes: torch.Tensor, experts: int) -> torch.Tensor:
    """Counts [layers, experts] of recorded routes [N, S, L, k]."""
    hot = multi_hot(routes, experts)
    return hot.sum(dim=(0, 1))


