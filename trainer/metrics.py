"""The metric catalogue: every name kiln writes to metrics.jsonl and W&B, its unit and meaning.

docs/monitoring.md is generated from CATALOGUE (`python -m kiln.trainer.metrics --markdown`) and
trainer/metrics.schema.json from `schema()` (`--schema`); a test holds both files to it, and the
training tests validate every record they read against the schema.

Names were flat before (`loss`, `mfu` as a fraction, ...). `upgrade` maps a record of that era to
today's names, so `kiln report` and `kiln status` read old run directories too.
"""
import json
import re
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("metrics.schema.json")

# (name, JSON type, unit, meaning). "{l}" / "{k}" / "{x}" stand for a layer index, a bucket
# exponent and a free suffix. Record kinds: train (every train.log_every steps), eval, step
# (decomposition, every step) and event (growth).
CATALOGUE = [
    ("step", "integer", "steps", "optimizer steps done when the record was written (kiln's own step axis)"),
    ("time", "number", "s", "unix time of the record"),
    # train
    ("train/loss", "number", "nats/token", "objective loss, mean over the window's steps and all ranks"),
    ("train/lr", "number", "", "learning rate at the record's step"),
    ("train/grad_norm", "number", "", "global gradient norm (NaN where DeepSpeed does not report one)"),
    ("train/skipped_steps", "integer", "steps", "steps skipped so far with no optimizer update: a non-finite loss or "
     "gradient norm, or a spike with train.spike_skip (kiln.trainer.hooks.guard)"),
    ("train/loss_spikes", "integer", "steps", "steps so far whose loss was above the mean + train.spike_sigma "
     "standard deviations of the last train.spike_window steps"),
    ("train/tokens", "integer", "tokens", "input tokens trained on so far, all ranks (also in eval records)"),
    ("train/flops", "number", "FLOP", "training FLOPs so far, all ranks (6N + attention, both models for ELECTRA)"),
    ("perf/tokens_per_s", "number", "tokens/s", "global training throughput over the window"),
    ("perf/tokens_per_s_per_device", "number", "tokens/s", "perf/tokens_per_s / ranks"),
    ("perf/mfu_pct", "number", "%", "model FLOPs utilisation against perf/peak_tflops_per_device (the peak of "
                                   "the precision in use)"),
    ("perf/peak_tflops_per_device", "number", "TFLOP/s", "the peak MFU is measured against: a probed GEMM "
                                                        "rate on CPU, the datasheet on known GPUs"),
    ("perf/step_s", "number", "s", "wall time per optimizer step over the window"),
    ("perf/data_s", "number", "s", "per step: building and placing batches"),
    ("perf/fwd_bwd_s", "number", "s", "per step: forward and backward"),
    ("perf/optim_s", "number", "s", "per step: optimizer step (and gradient reduction)"),
    ("perf/mem_peak_gb", "number", "GiB", "peak memory of rank 0 since the previous train record: CUDA "
                                         "allocator peak, or resident-set high-water mark on CPU"),
    # eval
    ("eval/loss", "number", "nats/token", "held-out loss (concat windows of data.seq_len); with "
     "data.packing=decompose the token-weighted mean of eval/loss_b{k} over the buckets"),
    ("eval/loss_b{k}", "number", "nats/token", "decompose: held-out loss of bucket k's chunks (2^k tokens, "
     "the valid split's own bucket), one record per evaluation"),
    ("eval/buckets", "integer", "buckets", "decompose: how many eval/loss_b{k} the record holds (the per-bucket "
     "record of an evaluation)"),
    ("eval/ppl", "number", "", "exp(eval/loss)"),
    # MoE
    ("moe/balance/l{l}", "number", "", "layer l: mean / max token-choices per rank (per expert without EP); 1 "
                                       "is perfect"),
    ("moe/balance_min", "number", "", "the lowest moe/balance/l{l}"),
    ("moe/balance_mean", "number", "", "the mean of moe/balance/l{l}"),
    ("moe/cross_rank_frac", "number", "", "transition fraction: consecutive-layer token-choice pairs whose "
                                          "experts sit on different ranks"),
    ("moe/expert_load", "array", "fraction", "layers x experts: each layer's share of token-choices per "
                                             "expert over the window (the expert-load heatmap)"),
    ("moe/aux_loss", "number", "", "router load-balancing + z losses, summed over layers"),
    ("moe/dropped", "number", "token-choices", "choices dropped by expert capacity over the window, all ranks"),
    ("moe/a2a_bytes_per_step", "number", "bytes", "off-rank bytes sent by expert-parallel all-to-alls per step "
                                                  "and rank"),
    ("moe/a2a_s_per_step", "number", "s", "time in expert-parallel all-to-alls per step and rank"),
    # sequence parallelism
    ("sp/fwd_forward_bytes_per_step", "number", "bytes", "ring attention bytes sent towards higher ranks in "
                                                         "the forward pass, per step and rank"),
    ("sp/fwd_backward_bytes_per_step", "number", "bytes", "... towards lower ranks, forward pass"),
    ("sp/bwd_forward_bytes_per_step", "number", "bytes", "... towards higher ranks, backward pass"),
    ("sp/bwd_backward_bytes_per_step", "number", "bytes", "... towards lower ranks, backward pass"),
    ("sp/comm_wait_s_per_step", "number", "s", "host time blocked waiting for ring messages per step (exposed "
                                               "communication; with NCCL the wait is asynchronous and this is "
                                               "near 0)"),
    # data (decomposition)
    ("data/bucket", "integer", "", "step record: the step's bucket k (rows of 2^k tokens)"),
    ("data/seq_len", "integer", "tokens", "step record: the step's row length"),
    ("data/batch_size", "integer", "rows", "step record: rows in the step, all ranks"),
    ("data/sp", "boolean", "", "step record: whether the step's rows were sharded sequence-parallel"),
    ("data/attn_flops", "number", "FLOP", "step record: causal attention FLOPs of the step"),
    ("data/step_s", "number", "s", "step record: the step's wall time on rank 0"),
    ("data/tokens_per_s_b{k}", "number", "tokens/s", "train record: throughput of bucket k's steps in the window"),
    # growth
    ("growth/stage", "integer", "", "the stage index (0 = the small model)"),
    ("growth/event", "string", "", "event record: 'grow:<op>' when a grown stage starts"),
    ("growth/params_small", "integer", "parameters", "event record: parameters before growing"),
    ("growth/params_large", "integer", "parameters", "event record: parameters after growing"),
    # objectives
    ("objective/{x}", "number", "", "the objective's own window metrics: mask_rate (MEAP, MLM), gen_mlm_acc, "
                                    "disc_acc, replaced_frac (ELECTRA), ..."),
]

# What each record kind must hold (the schema's anyOf).
KINDS = {"train": ["train/loss", "train/lr", "train/tokens", "perf/tokens_per_s", "perf/mfu_pct"],
         "eval": ["eval/loss", "eval/ppl"],
         "eval_buckets": ["eval/buckets"],  # decompose: eval/loss_b{k}, just before its eval record
         "step": ["data/bucket", "data/seq_len", "data/batch_size"],
         "event": ["growth/event"]}

# Names before the catalogue (session 1-7 run directories) -> today's.
OLD_NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
             "flops": "train/flops", "tokens_per_s": "perf/tokens_per_s", "mem_gb": "perf/mem_peak_gb",
             "time/step_s": "perf/step_s", "time/data_s": "perf/data_s", "time/fwd_bwd_s": "perf/fwd_bwd_s",
             "time/optim_s": "perf/optim_s"}


def _pattern(name: str) -> str:
    """The regex of a catalogue name ({l}, {k}: digits; {x}: a word)."""
    parts = re.split(r"(\{[lkx]\})", name)
    rx = {"{l}": r"[0-9]+", "{k}": r"[0-9]+", "{x}": r"[A-Za-z0-9_]+"}
    return "^" + "".join(rx.get(p, re.escape(p)) for p in parts) + "$"


def schema() -> dict:
    """The JSON schema of one metrics.jsonl record."""
    props, patterns = {}, {}
    for name, typ, unit, meaning in CATALOGUE:
        spec = {"type": typ, "description": f"{meaning} [{unit}]" if unit else meaning}
        if typ == "array":
            spec["items"] = {"type": "array", "items": {"type": "number"}}
        if "{" in name:
            patterns[_pattern(name)] = spec
        else:
            props[name] = spec
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "kiln metrics.jsonl record",
            "type": "object", "required": ["step", "time"], "properties": props,
            "patternProperties": patterns, "additionalProperties": False,
            "anyOf": [{"title": kind, "required": need} for kind, need in KINDS.items()]}


def upgrade(record: dict) -> dict:
    """A record with pre-catalogue names renamed (mfu, a fraction, becomes perf/mfu_pct)."""
    if "loss" not in record and "mfu" not in record and not any(k in record for k in OLD_NAMES):
        return record
    out = {OLD_NAMES.get(k, k): v for k, v in record.items() if k != "mfu"}
    if "mfu" in record:
        out["perf/mfu_pct"] = 100 * record["mfu"]
    return out


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl in today's names (a torn last line from a killed run is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(upgrade(rec))
    return out


def markdown() -> str:
    """The catalogue as the table in docs/monitoring.md."""
    rows = ["| name | unit | meaning |", "|---|---|---|"]
    rows += [f"| `{n}` | {u} | {m} |" for n, _, u, m in CATALOGUE]
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--schema"]:
        print(json.dumps(schema(), indent=1))
    elif sys.argv[1:] == ["--markdown"]:
        print(markdown())
    else:
        sys.exit("usage: python -m kiln.trainer.metrics --schema | --markdown")
