"""srun's variables -> torch.distributed's, the rendezvous preflight, the script, the requeue
decision and the sweep grid: the parts of kiln.slurm that need no cluster."""
import json
import socket

import pytest

from kiln.slurm.config import signal_number, time_seconds
from kiln.slurm.env import SlurmError, adopt_slurm_env, expand_nodelist, first_host, preflight
from kiln.slurm.requeue import classify, decide, write_stop
from kiln.slurm.sbatch import JobSpec, render
from kiln.slurm.sweep import grid, parse_sweeps, point_name


def step_env(**extra):
    env = {"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "localhost,localhost2",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242"}
    env.update(extra)
    return env


def test_slurm_task_variables_become_torch_distributed_ones():
    env = step_env(SLURM_JOB_NODELIST="gpu[07-08]")
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("3", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "24242"
    assert not adopt_slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert adopt_slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "KILN_SRUN_RANKS": "1"})
    assert not adopt_slurm_env({"SLURM_JOB_ID": "1"})  # inside sbatch but not in an srun step
    one = step_env(SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1")
    assert adopt_slurm_env(one) and one["MASTER_ADDR"] == "127.0.0.1"  # one node: nothing to resolve
    set_ = step_env(KILN_MASTER_ADDR="10.0.0.5")
    assert adopt_slurm_env(set_) and set_["MASTER_ADDR"] == "10.0.0.5"


def test_nodelists_expand_like_scontrol_show_hostnames():
    assert expand_nodelist("gpu[07-09,12],cpu3") == ["gpu07", "gpu08", "gpu09", "gpu12", "cpu3"]
    assert expand_nodelist("a[1-2]-ib[0-1]") == ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]
    assert first_host("n[01-04],m1") == "n01" and first_host("a1,b[2-3]") == "a1" and first_host("") == "127.0.0.1"


def test_preflight_names_each_way_a_world_splits():
    env = step_env(SLURM_JOB_NODELIST="localhost,vm-other")
    adopt_slurm_env(env)
    with pytest.raises(SlurmError, match="resolves to the loopback address 127.0.0.1 on a 2-node job"):
        preflight(env)
    with pytest.raises(SlurmError, match="SLURM_JOB_NUM_NODES=3 but SLURM_JOB_NODELIST=n\\[1-2\\] names 2"):
        preflight(step_env(SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="n[1-2]"))
    with pytest.raises(SlurmError, match="this srun step spans 1"):
        preflight(step_env(SLURM_STEP_NUM_NODES="1"))
    with pytest.raises(SlurmError, match="WORLD_SIZE=2 in the environment disagrees with SLURM_NTASKS=8"):
        preflight(step_env(WORLD_SIZE="2", KILN_MASTER_ADDR="10.0.0.5"))
    with pytest.raises(SlurmError, match="does not resolve"):
        preflight(step_env(MASTER_ADDR="no-such-host.invalid"))
    explicit = step_env(KILN_MASTER_ADDR="127.0.0.1")  # several slurmd on one host: set on purpose
    adopt_slurm_env(explicit)
    preflight(explicit)


def test_preflight_finds_the_port_taken_on_the_master():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        env = step_env(SLURM_PROCID="0", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1",
                       MASTER_PORT=str(s.getsockname()[1]))
        adopt_slurm_env(env)
        with pytest.raises(SlurmError, match=f"rendezvous port {s.getsockname()[1]} .* already in use"):
            preflight(env)
    preflight(env)  # free again


def test_time_limits_and_signals():
    assert [time_seconds(t) for t in ("90", "1:30", "01:00:00", "2-00", "1-02:03:04", "UNLIMITED")] == \
        [5400, 90, 3600, 172800, 93784, -1]
    assert time_seconds("1h") is None and time_seconds("") is None and time_seconds("1:2:3:4") is None
    assert signal_number("USR1") == signal_number("SIGUSR1") == 10 and signal_number("USR9") is None


def test_the_script_passes_secrets_by_name_and_arrays_pick_their_run_dir(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-value")
    job = JobSpec(job_name="tiny", run_dirs=["/r/a", "/r/b c"], workdir="/w", python="/py", log_dir="/r",
                  nodes=8, tasks_per_node=8, gpus_per_node=8, time="4:00:00", partition="gpu",
                  signal="SIGUSR2", lead_s=300, export=["WANDB_API_KEY", "HF_TOKEN"])
    text = render(job)
    assert "s3cr3t" not in text and "#SBATCH --export=ALL,WANDB_API_KEY,HF_TOKEN" in text
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@300", "#SBATCH --array=0-1", "#SBATCH --output=/r/slurm-%A_%a.out",
                 "RUN_DIRS=(/r/a '/r/b c')", "#SBATCH --partition=gpu", "#SBATCH --requeue"):
        assert line in text, line
    assert "DS_ACCELERATOR" not in text  # GPUs: NCCL


def test_requeue_counts_preemption_and_timeout_apart(tmp_path):
    budgets = {"preemption": 2, "timeout": 1}
    assert decide(tmp_path, 3000, 60, budgets)[0] == "finish"  # the run ended by itself
    assert classify(3000, 60) == "preemption" and classify(80, 60) == "timeout" and classify(None, 60) == "preemption"
    for expected in ("requeue", "requeue", "stop"):
        write_stop(tmp_path, "USR1", 7)
        assert decide(tmp_path, 3000, 60, budgets)[0] == expected
    write_stop(tmp_path, "USR1", 9)
    assert decide(tmp_path, 70, 60, budgets)[0] == "requeue"  # the timeout budget is its own
    write_stop(tmp_path, "USR1", 9)
    action, line = decide(tmp_path, 70, 60, budgets)
    assert action == "stop" and "1 timeout requeues used (slurm.max_requeues_timeout=1)" in line
    assert json.loads((tmp_path / "slurm" / "requeues.json").read_text()) == {"preemption": 2, "timeout": 1}
    write_stop(tmp_path, "TERM", 9)
    assert decide(tmp_path, 3000, 60, budgets)[0] == "stop"  # SIGTERM: Slurm decides, kiln does not requeue


def test_sweep_grid():
    sweeps = parse_sweeps(["optim.lr=1e-3,3e-4", "train.seed=1,2"])
    assert sweeps[0] == ("optim.lr", ["0.001", "0.0003"])
    points = grid(sweeps)
    assert len(points) == 4 and points[1] == ["optim.lr=0.001", "train.seed=2"]
    assert point_name(3, points[3]) == "03-lr0.0003-seed2"
    for bad in ("optim.lr", "optim.lr=", "=1,2", "optim.lr=1,,2"):
        with pytest.raises(SlurmError, match="must look like section.key=v1,v2"):
            parse_sweeps([bad])
