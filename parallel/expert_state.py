"""Moving experts between ranks (placement changes) and saving them placement-independently.

A placement change permutes rows of every rank's expert bank over the expert-parallel group:
the weights, the fp32 master copy (DeepSpeed ZeRO-1/2 and bf16 optimizers keep one) and every
optimizer state tensor of the same shape (Adam's exp_avg / exp_avg_sq). Bank shapes never change,
so DeepSpeed's buffers stay valid and the model computes the same function before and after.

Checkpoints: each expert-parallel rank writes `experts_ep{r}.pt` with its bank rows keyed by
(layer, expert) and the placement in force. Readers look experts up by (layer, expert), so any
placement (or a single unsharded process) can load them; DeepSpeed's own files carry the
optimizer state for the saved placement, which a resumed run restores first and then migrates.
"""
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kiln.parallel.expert import ExpertLayout
from kiln.parallel.placement.io import PlacementError

WEIGHTS = ("w1", "w3", "w2")
FORMAT = "kiln-experts-v1"


def _plan(old: ExpertLayout, new: ExpertLayout, me: int):
    """Rows this rank sends (old slot ids, grouped by destination) and where received rows go."""
    send, in_splits = [], []
    for r in range(new.ranks):
        rows = [old.slot_index[me][le] for le in new.slots[r] if old.placement[le] == me]
        send += rows
        in_splits.append(len(rows))
    recv_pos, out_splits = [], []
    for s in range(old.ranks):
        pos = [i for i, le in enumerate(new.slots[me]) if old.placement[le] == s]
        recv_pos += pos
        out_splits.append(len(pos))
    return torch.tensor(send, dtype=torch.long), in_splits, torch.tensor(recv_pos, dtype=torch.long), out_splits


def _torch_optimizer(opt):
    """The innermost torch optimizer (DeepSpeed wraps the client optimizer in some modes)."""
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def _state_keys(opt) -> list:
    """Names of the optimizer's per-element state tensors (e.g. exp_avg, exp_avg_sq)."""
    inner = _torch_optimizer(opt)
    if inner is None:
        return []
    keys = set()
    for st in inner.state.values():
        keys |= {k for k, v in st.items() if torch.is_tensor(v) and v.dim() >= 1}
    return sorted(keys)


def _relink_zero_state(optimizer) -> None:
    """Re-link ZeRO-1/2's per-parameter views of the optimizer state. DeepSpeed links them once,
    right after the *first* param group's first step, so groups stepped later (the expert
    groups come last) stay unlinked and safe_get_full_optimizer_state would not find them."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def migrate(model, new_placement, optimizer=None) -> dict:
    """Move experts (weights + optimizer state) to `new_placement`; collective over the expert
    group (every rank of the world calls it with the same placement). Returns
    {"moved_experts": experts whose rank changed, "bytes": bytes this rank sent}."""
    ep = model.kiln_ep
    old, new = ep.layout, ExpertLayout(new_placement, ep.ranks)
    if (new.layers, new.experts) != (old.layers, old.experts):
        raise PlacementError(f"new placement is [{new.layers}, {new.experts}] but the model has "
                             f"[{old.layers}, {old.experts}] experts; recompute it for this model")
    send, in_splits, recv_pos, out_splits = _plan(old, new, ep.rank)
    sent_bytes = 0

    def move(t: torch.Tensor) -> torch.Tensor:
        nonlocal sent_bytes
        rows = t[send.to(t.device)].contiguous()
        got = rows.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
        dist.all_to_all_single(got, rows, out_splits, in_splits, group=ep.group)
        sent_bytes += (sum(in_splits) - in_splits[ep.rank]) * rows[:1].numel() * rows.element_size()
        out = torch.empty_like(t)
        out[recv_pos.to(t.device)] = got
        return out

    keys = _state_keys(optimizer)
    inner = _torch_optimizer(optimizer)
    _relink_zero_state(optimizer)
    with torch.no_grad():
        for name in WEIGHTS:
            p = getattr(ep.bank.experts, name)
            if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 or bf16 optimizer: partitioned fp32 copies
                from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                             safe_set_full_fp32_param, safe_set_full_optimizer_state)
                safe_set_full_fp32_param(p, move(safe_get_full_fp32_param(p)))
                for key in keys:
                    safe_set_full_optimizer_state(p, move(safe_get_full_optimizer_state(p, key)), key)
            elif inner is not None and p in inner.state:
                for key, v in inner.state[p].items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.copy_(move(v))
            p.data.copy_(move(p.data))
    ep.set_layout(new)
    moved = int((old.placement != new.placement).sum())
    return {"moved_experts": moved, "bytes": sent_bytes}


def _full_rows(p: torch.Tensor) -> torch.Tensor:
    """This rank's bank rows at full precision (the fp32 master when an optimizer keeps one)."""
    if hasattr(p, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param
        return safe_get_full_fp32_param(p)  # collective over the expert-data-parallel group
    return p.detach()


def save_experts(model, ckpt_dir, write: bool) -> Path | None:
    """Write this rank's experts to ckpt_dir/experts_ep{r}.pt when `write` (one rank per
    expert-data-parallel group); every rank must call it (fp32 gathers are collective)."""
    ep = model.kiln_ep
    rows = {name: _full_rows(getattr(ep.bank.experts, name)).cpu().clone() for name in WEIGHTS}
    if not write:
        return None
    path = Path(ckpt_dir) / f"experts_ep{ep.rank}.pt"
    torch.save({"format": FORMAT, "placement": ep.placement.tolist(), "ranks": int(ep.ranks),
                "rank": int(ep.rank), "slots": ep.layout.slots[ep.rank], **rows}, path)
    return path


def _read(path: Path) -> dict:
    try:  # tensors, lists and ints only: weights_only=True, so a crafted file cannot run code
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise PlacementError(f"expert checkpoint {path} is unreadable ({type(e).__name__}); "
                             "resume from an older checkpoint or start over") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlacementError(f"{path} is not a kiln expert checkpoint; resume from another one")
    return doc


def expert_files(ckpt_dir) -> list:
    """The expert files of a checkpoint directory (empty when the run had no expert parallelism)."""
    return sorted(Path(ckpt_dir).glob("experts_ep*.pt"))


def saved_placement(ckpt_dir) -> np.ndarray | None:
    """The placement a checkpoint was saved under, or None if it has no expert files."""
    files = expert_files(ckpt_dir)
    return np.asarray(_read(files[0])["placement"], dtype=np.int64) if files else None


def read_full_experts(ckpt_dir) -> dict:
    """{name: [L, E, ...]} of every expert of a checkpoint, whatever its placement."""
    files = expert_files(ckpt_dir)
    if not files:
        raise PlacementError(f"no experts_ep*.pt in {ckpt_dir}: not an expert-parallel checkpoint")
    docs = [_read(f) for f in files]
    placement = np.asarray(docs[0]["placement"])
    if len(docs) != docs[0]["ranks"]:
        raise PlacementError(f"{ckpt_dir} holds {len(docs)} expert files but was saved by "
                             f"{docs[0]['ranks']} expert ranks; the checkpoint is incomplete")
    L, E = placement.shape
    full = {n: docs[0][n].new_empty((L, E) + tuple(docs[0][n].shape[1:])) for n in WEIGHTS}
    for d in docs:
        for i, (l, e) in enumerate(d["slots"]):
            for n in WEIGHTS:
                full[n][l, e] = d[n][i]
    return full


def load_experts(model, ckpt_dir) -> None:
    """Fill this rank's bank (any placement) from a checkpoint's expert files; also sets the fp32
    master copy when the optimizer keeps one. Every rank of the world calls it."""
    ep = model.kiln_ep
    full = read_full_experts(ckpt_dir)
    if tuple(full["w1"].shape[:2]) != (ep.layout.layers, ep.layout.experts):
        raise PlacementError(f"checkpoint experts are {tuple(full['w1'].shape[:2])} but the model has "
                             f"{(ep.layout.layers, ep.layout.experts)}; use a matching recipe")
    slots = ep.layout.slots[ep.rank]
    with torch.no_grad():
        for n in WEIGHTS:
            p = getattr(ep.bank.experts, n)
            rows = torch.stack([full[n][l, e] for l, e in slots]).to(p.device)
            p.data.copy_(rows.to(p.dtype))
            if hasattr(p, "_hp_mapping"):
                from deepspeed.utils import safe_set_full_fp32_param
                safe_set_full_fp32_param(p, rows.float())


class ExpertCheckpoint:
    """The checkpoint part of an expert-parallel model (see kiln.trainer.checkpoint): its
    `save_files(dir)` runs before DeepSpeed saves, `load_module` is DeepSpeed's custom_load_fn
    (strict except for the expert bank, whose rows differ per rank and come from kiln's files)
    and `load_files(dir)` runs after DeepSpeed has restored everything else."""

    def __init__(self, model, writer: bool):
        self.model, self.writer = model, writer

    def save_files(self, ckpt_dir) -> None:
        save_experts(self.model, ckpt_dir, self.writer)

    def load_module(self, src, dst) -> None:
        # DeepSpeed's model file may hold rank 0's bank rows: never load them into another rank
        src = {k: v for k, v in src.items() if "expert_bank." not in k}
        result = dst.load_state_dict(src, strict=False)
        missing = [k for k in result.missing_keys if "expert_bank." not in k]
        if missing or result.unexpected_keys:
            raise PlacementError(f"checkpoint model state does not match this model (missing "
                                 f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}): resume "
                                 f"with the parallel.ep and model settings it was saved with")

    def load_files(self, ckpt_dir) -> None:
        load_experts(self.model, ckpt_dir)
