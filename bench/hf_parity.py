"""The HF export's parity with kiln, measured: max-abs logit difference, KL, the largest
per-block hidden-state difference, write and gate times, for random-init models of the test
size and of the shipped recipes' sizes (tiny.yaml dense, moe_tiny.yaml as Mixtral), several seeds.
All in fp32 on the CPU; docs/interop.md holds the table.

    python bench/hf_parity.py [--seeds 3] [--seq 128]
"""
import argparse
import dataclasses
import inspect
import json
import tempfile
import time
from pathlib import Path

import torch

from kiln.data.tokenizer import train_tokenizer
from kiln.infer.hf_export import write_hf
from kiln.infer.hf_gate import run_gate
from kiln.model import ModelConfig, MoEConfig, Transformer, param_count

TEST = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
CONFIGS = {
    "test dense (dim 64, 2 layers)": TEST,
    "test MoE (4 experts, top-2)": dataclasses.replace(TEST, mlp="moe", moe=MoEConfig(num_experts=4, top_k=2)),
    "tiny.yaml dense (dim 256, 4 layers)": ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2),
    "moe_tiny.yaml (8 experts, top-2)": ModelConfig(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                                    mlp="moe", moe=MoEConfig(num_experts=8, top_k=2,
                                                                             expert_ffn_dim=192)),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    texts = [inspect.getsource(json), inspect.getsource(dataclasses)]
    tok = train_tokenizer(texts, 400)
    print(f"{'model':38} {'params':>9} {'max-abs':>9} {'KL':>9} {'block':>9} {'write s':>8} {'gate s':>7}")
    for name, cfg in CONFIGS.items():
        worst = {"max_abs": 0.0, "kl": 0.0, "block": 0.0, "write": 0.0, "gate": 0.0}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = Transformer(cfg).eval()
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                write_hf(model, tok, Path(d) / "hf", 4096)
                t1 = time.perf_counter()
                r = run_gate(model, Path(d) / "hf", tok, [t[:3000] for t in texts], seed=seed, seq=args.seq)
                t2 = time.perf_counter()
            assert r.ok, r.line()
            for k, v in (("max_abs", r.max_abs), ("kl", r.kl), ("block", max(r.block_max_abs)),
                         ("write", t1 - t0), ("gate", t2 - t1)):
                worst[k] = max(worst[k], v)
        print(f"{name:38} {param_count(cfg):>9,} {worst['max_abs']:9.2e} {worst['kl']:9.2e} {worst['block']:9.2e} "
              f"{worst['write']:8.2f} {worst['gate']:7.2f}")
    print(f"(worst of {args.seeds} seeds; 2 x {args.seq} random token ids; gates: max-abs <= 1e-4, KL <= 1e-6)")


if __name__ == "__main__":
    main()
