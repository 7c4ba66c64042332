"""The parity gate of a Hugging Face export: the folder loads in transformers and computes what
kiln computes.

Checked, all in fp32 on random token ids:
  * logits: max |kiln - HF| <= 1e-4 and mean KL(kiln || HF) per position <= 1e-6;
  * on a failure, the first place whose hidden states diverge: the embedding, block i (each
    decoder layer's output, captured by forward hooks on both models), or the final norm/head;
  * weights: every tensor transformers holds after loading equals kiln's (mapped back through
    kiln.model.hf), and for MoE the expert count per layer on disk and a per-expert checksum
    (sha256 of w1|w3|w2) on disk and in the loaded model: a converter that drops or mixes up
    experts fails here by name, not as a vague logit gap;
  * tokenizer: AutoTokenizer on the folder gives kiln's ids (kiln's corpus encoding, no EOT) on
    each text.
"""
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.model import hf

MAX_ABS, KL = 1e-4, 1e-6


@dataclass
class GateReport:
    """What the gate measured; `ok` when every check passed, `problems` names each failure."""

    architecture: str
    max_abs: float = float("nan")
    kl: float = float("nan")
    block_max_abs: list = field(default_factory=list)
    first_divergent: str | None = None
    experts_checked: int = 0
    texts_checked: int = 0
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """One line for the console."""
        head = (f"{self.architecture}: logits max-abs {self.max_abs:.2e} (<= {MAX_ABS:g}), "
                f"KL {self.kl:.2e} (<= {KL:g})") if self.max_abs == self.max_abs else \
            f"{self.architecture}: logits not compared"
        extra = (f", {self.experts_checked} experts' checksums" if self.experts_checked else "") + \
                f", tokenizer ids equal on {self.texts_checked} texts"
        if self.ok:
            return f"parity gate passed: {head}{extra}"
        return f"parity gate FAILED: {head}; " + "; ".join(self.problems)


def _capture(layers):
    """Forward hooks that collect each layer's output tensor (tuples: their first element)."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for m in layers]
    return seen, hooks


def _forward(kiln_model, hf_model, ids):
    """(kiln logits, HF logits, kiln stages, HF stages): stages are the embedding and each block."""
    k_seen, k_hooks = _capture([kiln_model.embed, *kiln_model.layers])
    h_seen, h_hooks = _capture([hf_model.model.embed_tokens, *hf_model.model.layers])
    try:
        with torch.no_grad():
            k_logits = kiln_model.logits(kiln_model(ids)).double()
            h_logits = hf_model(input_ids=ids).logits.double()
    finally:
        for h in k_hooks + h_hooks:
            h.remove()
    return k_logits, h_logits, k_seen, h_seen


def expert_checksums(state: dict, cfg) -> dict:
    """{(layer, expert): sha256 of its w1, w3, w2 rows in fp32} from a kiln-named state dict."""
    sums = {}
    for i in range(cfg.n_layers):
        key = f"layers.{i}.mlp.experts."
        if key + "w1" not in state:
            continue
        for e in range(state[key + "w1"].shape[0]):
            h = hashlib.sha256()
            for w in ("w1", "w3", "w2"):
                h.update(state[key + w][e].detach().float().contiguous().numpy().tobytes())
            sums[(i, e)] = h.hexdigest()
    return sums


def _check_weights(report, kiln_state, hf_model, cfg) -> None:
    """Every tensor transformers loaded, mapped back to kiln's names, equals kiln's; for MoE also
    the per-expert checksums of what it loaded."""
    try:
        loaded = hf.from_hf_state({k: v.detach().float() for k, v in hf_model.state_dict().items()}, cfg)
    except hf.Unmappable as e:
        report.problems.append(f"the loaded model's weights do not map back ({e})")
        return
    differ = [k for k in kiln_state if k not in loaded or not torch.equal(loaded[k], kiln_state[k])]
    if differ:
        report.problems.append(f"{len(differ)} tensors differ after loading in transformers, first {differ[:3]}")
    if cfg.mlp == "moe":
        _compare_experts(report, expert_checksums(kiln_state, cfg), expert_checksums(loaded, cfg), "in transformers")


def _compare_experts(report, want: dict, got: dict, where: str) -> None:
    bad = [k for k in want if got.get(k) != want[k]]
    if bad:
        report.problems.append(f"{len(bad)} experts' checksums differ {where}, first (layer, expert) {bad[:3]}")
    report.experts_checked = len(want)


def _check_experts_on_disk(report, kiln_state, on_disk: dict, cfg) -> None:
    """MoE: each layer's expert count in the files, and each expert's checksum there."""
    if cfg.mlp != "moe":
        return
    for i in range(cfg.n_layers):
        n = sum(k.startswith(f"model.layers.{i}.block_sparse_moe.experts.") and k.endswith(".w1.weight")
                for k in on_disk)
        if n != cfg.moe.num_experts:
            report.problems.append(f"layer {i} has {n} experts on disk, kiln has {cfg.moe.num_experts}")
    try:
        got = expert_checksums(hf.from_hf_state(on_disk, cfg), cfg)
    except hf.Unmappable as e:
        report.problems.append(f"experts on disk: {e}")
        return
    _compare_experts(report, expert_checksums(kiln_state, cfg), got, "on disk")


def _check_tokenizer(report, hf_dir: Path, kiln_tok, texts) -> None:
    from transformers import AutoTokenizer

    from kiln.data.encode import make_tokenizer

    auto = AutoTokenizer.from_pretrained(str(hf_dir))
    ours = make_tokenizer(kiln_tok.to_str())  # kiln's corpus encoder
    for n, text in enumerate(texts):
        want = ours.encode(text, add_special_tokens=False).ids
        got = auto(text)["input_ids"]
        if got != want:
            at = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            report.problems.append(f"AutoTokenizer's ids differ from kiln's on text {n} at token {at} "
                                   f"({got[at:at + 3]} vs {want[at:at + 3]})")
            return
    report.texts_checked = len(texts)


def run_gate(kiln_model, hf_dir, kiln_tok, texts, *, seed: int = 0, batch: int = 2, seq: int = 64) -> GateReport:
    """Load the HF folder `hf_dir` in transformers and compare it with `kiln_model` (see module doc)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from kiln.infer.hf_export import hf_state_on_disk

    hf_dir = Path(hf_dir)
    cfg = kiln_model.cfg
    report = GateReport(hf.architecture(cfg))
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its notes (e.g. a text longer than model_max_length) are not findings
    kiln_model = kiln_model.float().eval()
    kiln_state = {k: v.detach().float() for k, v in kiln_model.state_dict().items()}
    on_disk = hf_state_on_disk(hf_dir)
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                              output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as e:
        report.problems.append(f"transformers cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        _check_experts_on_disk(report, kiln_state, on_disk, cfg)
        _check_tokenizer(report, hf_dir, kiln_tok, texts)
        return report
    hf_model.eval()
    if type(hf_model).__name__ != report.architecture:
        report.problems.append(f"transformers built {type(hf_model).__name__}, not {report.architecture}")
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight" or not cfg.tie_embeddings]
    if missing:
        report.problems.append(f"transformers initialised {len(missing)} weights missing from the files "
                               f"at random, first {sorted(missing)[:3]}")

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    k_logits, h_logits, k_seen, h_seen = _forward(kiln_model, hf_model, ids)
    report.max_abs = float((k_logits - h_logits).abs().max())
    logp, logq = k_logits.log_softmax(-1), h_logits.log_softmax(-1)
    report.kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    report.block_max_abs = [float((a.double() - b.double()).abs().max()) for a, b in zip(k_seen[1:], h_seen[1:])]
    if not (report.max_abs <= MAX_ABS and report.kl <= KL):
        report.first_divergent = "the final norm or LM head"
        for j, (a, b) in enumerate(zip(k_seen, h_seen)):
            a, b = a.double(), b.double()
            if (a - b).abs().max() > MAX_ABS * max(1.0, float(a.abs().max())):
                report.first_divergent = "the token embedding" if j == 0 else f"block {j - 1}"
                break
        report.problems.append(f"logits differ; hidden states first diverge at {report.first_divergent}")
    _check_weights(report, kiln_state, hf_model, cfg)
    _check_experts_on_disk(report, kiln_state, on_disk, cfg)
    _check_tokenizer(report, hf_dir, kiln_tok, texts)
    return report
