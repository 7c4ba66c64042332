"""End-to-end training on 2 gloo ranks through the real CLI, DeepSpeed and the embedded corpus."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, kiln, losses, metrics

pytestmark = pytest.mark.slow


def test_zero_stages_train_and_agree(small_recipe, tmp_path):
    curves = {}
    for stage in (0, 1, 2, 3):
        res = kiln("train", small_recipe, "--set", f"parallel.zero_stage={stage}",
                   "--set", f"train.name=z{stage}")
        run = tmp_path / "runs" / f"z{stage}"
        curves[stage] = losses(run)
        assert sorted(curves[stage]) == [1, 2, 3, 4, 5, 6]
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
        assert "kiln report" in res.stdout
    # ZeRO shards state, it does not change the function: every stage follows stage 0's curve
    for stage in (1, 2, 3):
        for step, ref in curves[0].items():
            assert abs(curves[stage][step] - ref) < 1e-4 * ref, (stage, step, curves[stage][step], ref)


def test_loss_falls_on_embedded_corpus(small_recipe, tmp_path):
    kiln("train", small_recipe, "--set", "train.steps=40", "--set", "train.name=fall",
         "--set", "checkpoint.every=40", "--set", "train.eval_every=40", "--set", "train.eval_batches=2")
    recs = metrics(tmp_path / "runs" / "fall")
    train = [r["train/loss"] for r in recs if "train/loss" in r]
    first, last = sum(train[:3]) / 3, sum(train[-3:]) / 3
    assert first > 5.5  # ~ln(512) at init
    assert last < first - 1.0, (first, last)
    ev = [r for r in recs if "eval/loss" in r]
    assert ev and ev[-1]["eval/loss"] < first - 0.7  # held-out generalises, less than train fits
    assert all(k in recs[0] for k in ("perf/tokens_per_s", "perf/mfu_pct", "train/grad_norm", "train/lr", "perf/fwd_bwd_s",
                                       "perf/data_s", "perf/optim_s", "perf/mem_peak_gb"))


def _live_processes(fragment: str) -> list[int]:
    """PIDs whose command line contains `fragment`, zombies (killed, not reaped) excluded."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if fragment in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def test_kill_and_resume_equals_uninterrupted(small_recipe, tmp_path):
    common = ["--set", "train.steps=24", "--set", "checkpoint.every=8", "--set", "model.dim=128",
              "--set", "train.grad_accum=2", "--set", "train.micro_batch=2",
              "--set", "data.seq_len=128"]
    kiln("train", small_recipe, *common, "--set", "train.name=straight")
    ref = losses(tmp_path / "runs" / "straight")

    run = tmp_path / "runs" / "killed"
    cmd = [sys.executable, "-m", "kiln.trainer.cli", "train", str(small_recipe), *common,
           "--set", "train.name=killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        latest = run / "checkpoints" / "latest"
        if latest.exists() and (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= 9:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # `kiln train` and torchrun (the ranks have own sessions)
    proc.wait()
    # the ranks notice that torchrun is gone and stop: none trains on beside the resumed run
    deadline = time.time() + 20
    while time.time() < deadline and _live_processes(f"--run-dir {run}"):
        time.sleep(0.1)
    assert not _live_processes(f"--run-dir {run}"), "orphaned ranks kept running"
    killed_at = max(losses(run))
    assert killed_at < 24

    res = kiln("train", small_recipe, *common, "--set", "train.name=killed")
    assert "resuming" in res.stdout
    got = losses(run)
    assert sorted(got) == list(range(1, 25))
    assert got == ref  # exactly the same curve, step for step


def _endless_run(recipe, run: Path) -> subprocess.Popen:
    """`kiln train` in its own session (stderr piped), returned once its first checkpoint exists."""
    cmd = [sys.executable, "-m", "kiln.trainer.cli", "train", str(recipe), "--set", "train.steps=100000",
           "--set", "checkpoint.every=2", "--set", f"train.name={run.name}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoints" / "latest").exists():
        time.sleep(0.05)
    return proc


def test_ctrl_c_stops_every_rank_with_one_line(small_recipe, tmp_path):
    run = tmp_path / "runs" / "ctrlc"
    proc = _endless_run(small_recipe, run)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [x for x in err.splitlines() if x.strip() and "arning" not in x and "DeepSpeed" not in x]
    assert lines[-1].startswith("kiln: interrupted; the newest checkpoint, step_"), err
    assert lines[-1].endswith("is kept: run the same command to resume")
    assert "Traceback" not in err
    assert not _live_processes(f"--run-dir {run}")


def test_a_rank_killed_by_the_oom_killer_gets_one_line(small_recipe, tmp_path):
    """SIGKILL to one rank (what the out-of-memory killer sends): the rank says nothing itself,
    so `kiln train` names it, the likely cause and the checkpoint to resume from, in place of
    torchrun's traceback and report."""
    run = tmp_path / "runs" / "oom"
    proc = _endless_run(small_recipe, run)
    ranks = [p for p in _live_processes(f"--run-dir {run}")  # torchrun's own command line holds it too
             if b"kiln.trainer.torchrun" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [x for x in err.splitlines() if x.strip()]
    assert [x for x in lines if "rror" in x] == [lines[-1]], err  # one error line, and the last
    assert lines[-1].startswith("kiln: error: rank ") and "was killed by SIGKILL (the out-of-memory killer" in lines[-1]
    assert "the newest checkpoint, step_" in lines[-1] and lines[-1].endswith("run the same command to resume")
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert not _live_processes(f"--run-dir {run}")


def test_sequence_parallel_run_follows_the_single_rank_run(small_recipe, tmp_path):
    # the same global batch (one data-parallel rank) split over 2 sequence ranks, or not at all
    kiln("train", small_recipe, "--nproc", "1", "--set", "train.name=sp1")
    ref = losses(tmp_path / "runs" / "sp1")
    for impl in ("tokenring", "ring"):
        kiln("train", small_recipe, "--set", "parallel.sp=2", "--set", f"parallel.sp_impl={impl}",
             "--set", f"train.name=sp2{impl}")
        recs = metrics(tmp_path / "runs" / f"sp2{impl}")
        got = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}
        assert sorted(got) == sorted(ref)
        for step in ref:  # fp32 over 6 optimizer steps
            assert abs(got[step] - ref[step]) < 1e-4 * ref[step], (impl, step, got[step], ref[step])
        sent = [r["sp/fwd_backward_bytes_per_step"] + r["sp/fwd_forward_bytes_per_step"] for r in recs
                if "train/loss" in r]
        assert all(b > 0 for b in sent)


def test_compiled_blocks_follow_the_eager_run(small_recipe, tmp_path):
    kiln("train", small_recipe, "--set", "train.name=eager", "--set", "train.steps=4")
    kiln("train", small_recipe, "--set", "train.name=compiled", "--set", "train.steps=4",
         "--set", "train.compile=true")
    ref, got = losses(tmp_path / "runs" / "eager"), losses(tmp_path / "runs" / "compiled")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:  # fused kernels reorder float sums: fp32 agreement, not bitwise
        assert abs(got[step] - ref[step]) < 1e-4 * ref[step], (step, got[step], ref[step])


def test_only_refused_writes_count_as_storage_failures():
    """A failed checkpoint save says 'free space' only for a write the machine refused; any other
    error keeps its traceback."""
    import errno

    from kiln.trainer.checkpoint import _storage_failure

    assert _storage_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert _storage_failure(RuntimeError("basic_ios::clear: iostream error"))  # torch.save, full disk
    assert _storage_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7950272 vs 7950160"))
    assert not _storage_failure(OSError(errno.ENOENT, "No such file or directory"))
    assert not _storage_failure(RuntimeError("shape mismatch in a bug"))
