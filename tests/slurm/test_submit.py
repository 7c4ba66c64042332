"""`kiln submit recipes/tiny.yaml` (shrunk) against a real slurmctld (tests/slurm/conftest.py starts one, with two slurmd on
this host): a 2-task job runs to the end; a 2-node job signalled mid-run checkpoints, requeues and
ends on the uninterrupted job's loss curve; a sweep's array runs every point; bad input is refused
with one line before anything reaches sbatch."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import scontrol, squeue, wait_done, wait_for_step
from tests.trainer.conftest import kiln, losses, metrics

pytestmark = pytest.mark.slow

STEPS = 60  # the reference and the preempted run: room for the signal to land before the end


def submit(recipe, *args):
    res = kiln("submit", *recipe, "--time", "10", *args)
    lines = res.stdout.splitlines()
    job = lines[0].split()[3]
    home = lines[1].split(": ", 1)[1].strip()
    return job, home, res


@pytest.fixture(scope="module")
def sweep(slurm_recipe):
    """A 2-point sweep of 1-rank tasks, submitted first: it runs beside the reference job on the
    other node (the cluster has 2 x 2 CPUs), and its test waits for it."""
    return submit(slurm_recipe, "--set", "train.name=sw", "--set", "train.steps=3", "--set", "train.nproc=1",
                  "--sweep", "optim.lr=1e-3,3e-3")


@pytest.fixture(scope="module")
def reference(slurm_recipe, sweep):
    """An uninterrupted 2-task job of STEPS steps: (run dir, submit output, seconds)."""
    os.environ["WANDB_API_KEY"] = "kiln-test-secret-0451"  # must reach the job by name only
    t0 = time.time()
    try:
        job, home, res = submit(slurm_recipe, "--set", "train.name=whole", "--set", f"train.steps={STEPS}")
    finally:
        del os.environ["WANDB_API_KEY"]
    wait_done(job, Path(home) / "slurm-*.out")
    return Path(home), job, res, time.time() - t0


def test_a_two_task_job_runs_to_the_end(reference):
    run_dir, job, res, seconds = reference
    assert f"log:     {run_dir}/slurm-{job}.out" in res.stdout
    assert scontrol(job)["JobState"] == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-2000:]
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    assert scontrol(job)["Restarts"] == "0" and not (run_dir / "slurm" / "requeues.json").exists()  # finished: no requeue
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "2 ranks (cpu" in log and "kiln: done." in log
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --export=ALL,WANDB_API_KEY,HF_TOKEN" in script
    for path in run_dir.rglob("*"):  # the key reached the job by name: never its value, anywhere
        if path.is_file() and path.stat().st_size < 1e6:
            assert b"kiln-test-secret-0451" not in path.read_bytes(), path
    status = kiln("status", run_dir).stdout
    assert f"job {job}: COMPLETED" in status and f"step {STEPS}/{STEPS}" in status and "done" in status
    timing = json.loads((run_dir / "slurm" / "timing.json").read_text())
    print(f"\nslurm: 2-task job of {STEPS} steps done in {seconds:.1f} s from submit; "
          f"checkpoint {timing['checkpoint_s']:.3f} s, step {timing['step_s']:.3f} s")


def test_a_signalled_two_node_job_checkpoints_requeues_and_finishes_on_the_same_curve(slurm_recipe, reference,
                                                                                   capsys):
    """Two slurmd on this host stand for two nodes, one rank each; their names do not resolve, so
    the address is given (slurm.master_addr), as on a cluster whose node names are not DNS names.
    The curve is the 1-node 2-task reference's: the same 2-rank world."""
    t0 = time.time()
    job, home, _ = submit(slurm_recipe, "--nodes", "2", "--set", "train.nproc=1", "--set", "slurm.master_addr=127.0.0.1",
                          "--set", "train.name=preempted", "--set", f"train.steps={STEPS}")
    run_dir = Path(home)
    wait_for_step(run_dir / "metrics.jsonl", 6, job)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what a preemption warning does
    t_signal = time.time()
    while scontrol(job).get("Restarts", "0") == "0":  # the stop, the checkpoint, the requeue
        assert squeue(job), "the job ended without being requeued:\n" + (run_dir / f"slurm-{job}.out").read_text()
        time.sleep(0.2)
    t_requeued = time.time()
    from kiln.trainer.cli import main  # a second job on the same run dir, while this one is queued again

    assert main(["submit", *slurm_recipe, "--set", "train.name=preempted"]) == 2
    assert capsys.readouterr().err.startswith(f"kiln: error: {run_dir} is already submitted as job {job} (")
    while "RUNNING" not in squeue(job):
        time.sleep(0.2)
    t_running = time.time()
    wait_done(job, run_dir / "slurm-*.out")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert scontrol(job)["JobState"] == "COMPLETED" and scontrol(job)["NumNodes"] == "2", log[-3000:]
    assert "2 ranks (cpu" in log
    stopped = [line for line in log.splitlines() if line.startswith("kiln: stopped by SIGUSR1 after step_")]
    assert len(stopped) == 1, log[-3000:]
    stop_step = int(stopped[0].split("step_")[1].split()[0])
    assert 6 <= stop_step < STEPS and (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    assert f"kiln: resuming {run_dir} from step_{stop_step:08d}" in log
    assert "kiln: preemption at step" in log and json.loads((run_dir / "slurm" / "requeues.json").read_text()) == \
        {"preemption": 1}
    assert losses(run_dir) == losses(reference[0])  # bitwise: same world size, CPU
    assert [r["step"] for r in metrics(run_dir) if "train/loss" in r] == list(range(1, STEPS + 1))
    print(f"\nslurm: stop + checkpoint + requeue {t_requeued - t_signal:.1f} s after the signal, running again "
          f"{t_running - t_requeued:.1f} s later; whole preempted job {time.time() - t0:.1f} s")


def test_a_sweep_runs_one_array_task_per_point(sweep):
    job, home, res = sweep
    assert "array of 2: 00-lr0.001, 01-lr0.003" in res.stdout
    wait_done(job, Path(home) / "slurm-*.out")
    sweep = json.loads((Path(home) / "sweep.json").read_text())
    for point in sweep["points"]:
        run_dir = Path(point["run_dir"])
        assert sorted(losses(run_dir)) == [1, 2, 3], point
        recipe = (run_dir / "recipe.yaml").read_text()
        assert f"lr: {point['overrides'][0].split('=')[1]}" in recipe and "group: sw" in recipe
    assert len(list(Path(home).glob(f"slurm-{job}_*.out"))) == 2
    status = kiln("status", home).stdout
    assert "00-lr0.001: step 3/3" in status and "01-lr0.003: step 3/3" in status


@pytest.mark.parametrize("args, says", [
    (["--nodes", "-1"], "kiln: error: --nodes must be >= 1, got -1"),
    (["--partition", "nosuch"], "kiln: error: slurm.partition='nosuch' is not a partition of this cluster "
                                "(sinfo lists debug): --partition NAME"),
    (["--time", "1h"], "kiln: error: slurm.time='1h' is not a Slurm time limit"),
    (["--sweep", "optim.lrr=1,2"], "kiln: error: --sweep optim.lrr=1: unknown key 'optim.lrr' (did you mean 'lr'?)"),
])
def test_bad_input_is_one_line_before_anything_is_submitted(slurm_recipe, capsys, args, says):
    from kiln.trainer.cli import main

    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert main(["submit", *slurm_recipe, "--set", "train.name=bad", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and err.count("\n") == 1, err
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (Path(slurm_recipe[-1].split("=", 1)[1]) / "bad").exists()


def test_dry_run_prints_the_script_and_submits_nothing(slurm_recipe, capsys):
    from kiln.trainer.cli import main

    assert main(["submit", *slurm_recipe, "--set", "train.name=dry", "--nodes", "8", "--gpus-per-node", "8",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --nodes=8" in out and "#SBATCH --gpus-per-node=8" in out
    assert not (Path(slurm_recipe[-1].split("=", 1)[1]) / "dry").exists()
