"""bench/gpu_check.py: its CPU dry run end to end, and the pieces its verdicts rest on.

The dry run is the GPU check's own code path (triton's interpreter, tiny shapes, one tiny
`kiln train`), so a change that breaks the check fails here, not on the next lent GPU.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from gpu import common  # noqa: E402
from gpu.common import poisoned, rel_err, within  # noqa: E402


def _check(*args, timeout=400):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    res = _check("--dry-run", "--out", out, "--budget-s", 600)  # a budget nothing on a slow CPU reaches
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res, json.loads((out / "gpu_check.json").read_text()), out


@pytest.mark.slow
def test_dry_run_runs_every_part(dry):
    res, data, out = dry
    assert data["meta"]["dry_run"] is True and data["install"]["ok"] is True
    for part in ("kernels", "speed", "train", "sp"):
        assert data[part]["status"] == "ran", (part, data[part])
    assert (out / "gpu_check.log").read_text().count("== ") >= 5


@pytest.mark.slow
def test_dry_run_kernels_within_tolerance(dry):
    _, data, _ = dry
    cases = data["kernels"]["cases"]
    names = {c["case"] for c in cases}
    # every case in both precisions (fp16 stands in for bf16 where the interpreter has no bf16 dot)
    assert {"rms_norm", "swiglu", "rope", "linear_ce", "attention_causal_gqa", "attention_doc_mask",
            "attention_fwd_lse", "moe_permute", "moe_unpermute", "grouped_linear"} == names
    for c in cases:
        assert c["ok"] is True, c
        assert c["errors"] and all(e <= c["tol"] for e in c["errors"].values()), c
    by = {(c["case"], c["dtype"]) for c in cases}
    assert all((n, "fp32") in by and ((n, "bf16") in by or (n, "fp16") in by) for n in names)
    grads = {c["case"]: set(c["errors"]) for c in cases if c["dtype"] == "fp32"}
    assert grads["rms_norm"] == {"out", "dx", "dw"} and grads["linear_ce"] == {"loss", "dh", "dw"}
    assert grads["attention_doc_mask"] == {"out", "dq", "dk", "dv"}
    assert grads["moe_permute"] == {"x_perm", "counts", "row_map", "dx"}
    assert grads["moe_unpermute"] == {"out", "dy", "dwts"}


@pytest.mark.slow
def test_dry_run_speed_train_sp_and_table(dry):
    res, data, _ = dry
    rows = {(c["op"], c["impl"]): c for c in data["speed"]["cases"]}
    for op in ("rms_norm", "rope", "swiglu", "attention_causal", "attention_doc", "moe_permute+unpermute"):
        assert rows[(op, "triton")]["ms"] > 0, op
        peer = rows.get((op, "eager")) or rows.get((op, "sdpa"))
        assert peer is not None and peer["max_abs_diff"] < 1e-3, (op, peer)  # fp32: the two agree
    assert rows[("grouped_gemm", "grouped_mm")]["ms"] > 0
    train = {c["run"]: c for c in data["train"]["cases"]}
    g = train["gpt2_small"]
    assert g["rc"] == 0 and g["steps"] == 4 and g["tokens_per_s"] > 0 and 0 < g["mfu_measured_peak"] < 1
    assert train["moe_1gpu"]["ok"] is True  # its overrides form a valid recipe
    assert "hf_llama" in train
    sp = data["sp"]["cases"]
    assert [c["tokens"] for c in sp] == [32, 64] and all(c["ok"] for c in sp)
    assert all(max(c["diff"].values()) < 1e-5 for c in sp)  # fp32: the merged blocks are SDPA
    tail = res.stdout[res.stdout.index("== gpu_check"):]
    assert "kernels: ran" in tail and "goals:" in tail and "met        every kernel within its tolerance" in tail


def test_poisoned_outputs_fail_when_a_kernel_skips_elements():
    def half_written(x):  # a "kernel" that forgets the second half of its output
        y = torch.empty_like(x)
        y[: len(x) // 2] = x[: len(x) // 2]
        return y
    x = torch.randn(64)
    with poisoned():
        y = half_written(x)
        z = torch.empty(3, dtype=torch.int64)
    assert torch.isnan(y[32:]).all() and (z == -7777).all()
    assert not within(rel_err(y, x), 1.0)
    assert torch.empty is common._EMPTY and torch.empty_like is common._EMPTY_LIKE  # restored
    assert within(rel_err(x.clone(), x), 0.0)


def test_bad_arguments_one_line_and_exit_2(tmp_path):
    res = _check("--parts", "kernels,nope", "--out", tmp_path, timeout=60)
    assert res.returncode == 2 and "unknown part 'nope'" in res.stderr.strip().splitlines()[-1]
    res = _check("--out", tmp_path, timeout=120)  # no --dry-run on a machine without CUDA
    if not torch.cuda.is_available():
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "no CUDA device" in lines[0], res.stderr


def test_gpu_only_settings_stay_valid():
    """What only the GPU runs: its recipes with their overrides load, and its tables build."""
    from gpu import kernels, speed, train
    from kiln.trainer.config import load_recipe

    for name, (recipe, sets) in train.GPU_RUNS.items():
        full = {**train.COMMON, "train.name": name, "data.max_documents": 1500, **sets}
        r = load_recipe(ROOT / recipe, [f"{k}={v}" for k, v in full.items()])
        assert r.train.nproc == 1 and r.parallel.ep == 1 and r.logging.wandb.mode == "disabled"
    table = speed.ops(torch.device("cpu"), dry=False)
    assert {"linear_ce_32k", "linear_ce_128k", "attention_causal", "attention_doc", "grouped_gemm"} <= set(table)
    for op in ("rms_norm", "rope", "swiglu", "linear_ce_32k", "linear_ce_128k"):
        assert {"triton", "eager", "torch.compile"} <= set(table[op][1]), op
    assert "flex" in table["attention_doc"][1]  # this torch has FlexAttention
    assert set(kernels._cases(torch.device("cpu"), dry=False)) >= {"grouped_linear", "attention_doc_mask"}
