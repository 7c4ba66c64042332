"""The `kiln` command as users meet it: help, and one clear line + exit 2 for each mistake."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.trainer.conftest import ROOT, kiln


def one_error_line(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if "error" in x.lower()]
    # progress lines may precede it; the error itself is one line, and the last one
    assert errors == [lines[-1]] and lines[-1].startswith("kiln: error: "), res.stderr
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    assert "Traceback" not in res.stderr + res.stdout


def test_help_lists_commands():
    res = kiln("--help")
    for cmd in ("train", "prepare", "config", "report", "generate", "eval", "expertflow"):
        assert cmd in res.stdout
    assert "--no-resume" in kiln("train", "--help").stdout
    from importlib.metadata import version
    assert kiln("--version").stdout.strip() == f"kiln {version('kiln')}"


def _torch_imports(stderr: str) -> list[str]:
    """The torch modules in a `python -X importtime` listing (that process's imports only)."""
    names = [ln.split("|")[-1].strip() for ln in stderr.splitlines() if ln.startswith("import time:")]
    assert "kiln.trainer.config" in names, "the listing is missing"
    return [m for m in names if m == "torch" or m.startswith("torch.")]


def test_the_cli_parent_process_never_imports_torch(small_recipe):
    """The `kiln` process itself reads the recipe, prepares the data and starts the ranks without
    torch (2-4 s of import on every call, for --help and for one-line errors too); only the ranks
    import it. -X importtime lists the parent's imports (the ranks do not inherit the flag)."""
    def cli(*args):
        return subprocess.run([sys.executable, "-X", "importtime", "-m", "kiln.trainer.cli", *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    res = cli("train", small_recipe, "--set", "train.steps=1", "--set", "train.nproc=1", "--set", "checkpoint.every=0")
    assert res.returncode == 0 and "step      1/1" in res.stdout, res.stderr[-3000:]  # the ranks had torch
    assert "kiln.trainer.launch" in res.stderr and _torch_imports(res.stderr) == []
    for args in (["--help"], ["config", small_recipe], ["prepare", small_recipe]):
        res = cli(*args)
        assert res.returncode == 0 and _torch_imports(res.stderr) == [], args


def test_config_prints_resolved_recipe_and_reference():
    res = kiln("config", ROOT / "recipes/tiny.yaml", "--set", "train.steps=3")
    assert "steps: 3" in res.stdout and "name: tiny" in res.stdout
    assert "| `train.steps` | int |" in kiln("config", "--reference").stdout


def test_missing_recipe(tmp_path):
    for cmd in ("train", "prepare", "config"):
        one_error_line(kiln(cmd, tmp_path / "nope.yaml", check=False), "not found", "nope.yaml")


def test_unknown_key_and_bad_override(tmp_path):
    one_error_line(kiln("config", ROOT / "recipes/tiny.yaml", "--set", "train.stepz=3", check=False),
                   "unknown key 'train.stepz'", "did you mean 'steps'")
    one_error_line(kiln("train", ROOT / "recipes/tiny.yaml", "--set", "model.n_kv_heads=3", check=False),
                   "n_kv_heads")
    one_error_line(kiln("train", ROOT / "recipes/tiny.yaml", "--nproc", "3", "--set", "parallel.sp=2",
                        check=False), "multiple of parallel.sp")


def test_unknown_command_and_missing_argument():
    res = kiln("trian", check=False)
    assert res.returncode == 2 and "invalid choice" in res.stderr
    res = kiln("train", check=False)
    assert res.returncode == 2 and "recipe" in res.stderr


def test_misspelt_option_names_the_one_meant_and_abbreviations_are_refused(small_recipe, tmp_path):
    one_error_line(kiln("train", small_recipe, "--nprocs", "2", check=False),
                   "kiln train does not take --nprocs 2 (did you mean '--nproc'?)")
    # an abbreviation used to pass: --no-resum moved the run aside as --no-resume does
    one_error_line(kiln("train", small_recipe, "--no-resum", check=False), "did you mean '--no-resume'?")
    one_error_line(kiln("place", tmp_path, "--time_limit", "5", check=False), "did you mean '--time-limit'?")
    assert not (tmp_path / "runs").exists()  # nothing started


def test_unreadable_corpus_path(small_recipe):
    one_error_line(kiln("prepare", small_recipe, "--set", "data.source=/no/such/corpus.txt", check=False),
                   "/no/such/corpus.txt")


def test_unwritable_cache_and_run_folders(small_recipe, tmp_path):
    """A folder that cannot be created (here: below a regular file, which stops root too) is named
    with its knob before anything is prepared or any rank starts."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for cmd, knob in (("prepare", "data.cache_dir"), ("train", "data.cache_dir"), ("train", "train.run_root")):
        res = kiln(cmd, small_recipe, "--set", f"{knob}={blocker}/sub", check=False)
        one_error_line(res, f"{knob}={blocker}/sub is not a writable folder", f"--set {knob}=DIR")
    assert blocker.read_text() == ""


def _file_size_limit(nbytes):
    def apply():  # in the child: writes past nbytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(small_recipe, tmp_path):
    run = tmp_path / "runs" / "small"
    ckpts = run / "checkpoints"
    kiln("train", small_recipe, "--set", "train.steps=3", "--set", "checkpoint.every=1",
         "--set", "checkpoint.keep=2")
    # a damaged newer checkpoint the user stepped back from by editing `latest`
    (ckpts / "step_00000009").mkdir()
    (ckpts / "step_00000009" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    os.utime(ckpts / "step_00000009", (time.time() - 60, time.time() - 60))
    res = kiln("train", small_recipe, check=False, preexec_fn=_file_size_limit(200_000))
    one_error_line(res, "saving checkpoint step_00000006", "free space or point train.run_root elsewhere",
                   "resume from step_00000003")
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    # the half-written tag is gone (kiln train removes it once every rank has exited: the rank
    # that failed cannot, another may still be creating the folder); older saves stay
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000009"]
    again = kiln("train", small_recipe, "--set", "checkpoint.keep=2")
    assert "resuming" in again.stdout and "step_00000003" in again.stdout
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    # pruning keeps the 2 newest up to the new save and never touches the newer folder
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003", "step_00000006", "step_00000009"]


def test_prepare_write_failure_is_one_line(small_recipe, tmp_path):
    res = kiln("prepare", small_recipe, "--set", f"data.cache_dir={tmp_path / 'c'}", check=False,
               preexec_fn=_file_size_limit(20_000))
    one_error_line(res, f"writing {tmp_path / 'c'}/data-", "file too large", "run the same command again")
    assert sorted(os.listdir(tmp_path / "c")) == ["tokenizers"]  # no temp or half-written data folder


def test_model_vocab_smaller_than_tokenizer(small_recipe):
    # caught by `kiln train` itself after preparing the data, before any rank starts
    one_error_line(kiln("train", small_recipe, "--set", "model.vocab_size=100", check=False),
                   "model.vocab_size=100", "512", "set model.vocab_size to 0")


def test_gpu_recipe_without_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, on any machine
    one_error_line(kiln("train", ROOT / "recipes/gpt2_small.yaml", "--set", f"train.run_root={tmp_path}",
                        check=False), "train.device=cuda", "no CUDA GPU", "train.device=cpu")
    assert not list(tmp_path.iterdir())  # refused before preparing data or making a run dir


def test_report_on_non_run_dir(tmp_path):
    one_error_line(kiln("report", tmp_path, check=False), "metrics.jsonl")


@pytest.mark.slow
def test_second_train_on_a_busy_run_dir_is_refused(small_recipe, tmp_path):
    run = tmp_path / "runs" / "busy"
    args = ["train", str(small_recipe), "--set", "train.steps=100000", "--set", "train.name=busy"]
    first = subprocess.Popen([sys.executable, "-m", "kiln.trainer.cli", *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.05)
        for extra in ([], ["--no-resume"]):  # --no-resume must not move a live run aside either
            one_error_line(kiln("train", small_recipe, "--set", "train.name=busy", *extra, check=False),
                           f"{run} is in use by another kiln train (pid {first.pid}", "another train.name")
        assert first.poll() is None and run.is_dir()  # the first run goes on, where it was
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=120)
    kiln("train", small_recipe, "--set", "train.name=busy", "--set", "train.steps=1", "--no-resume")


@pytest.mark.slow
def test_corrupt_data_files_and_mismatched_checkpoint(small_recipe, tmp_path, kiln_home):
    res = kiln("train", small_recipe, "--set", "train.steps=3", "--set", "train.name=shape")
    run = tmp_path / "runs" / "shape"
    saved = sorted(p.name for p in (run / "checkpoints").rglob("*"))
    # a checkpoint from a different model shape: refused, nothing touched
    one_error_line(kiln("train", small_recipe, "--set", "train.steps=3", "--set", "train.name=shape",
                        "--set", "model.dim=96", check=False), "model.dim=64", "96", "--no-resume")
    assert sorted(p.name for p in (run / "checkpoints").rglob("*")) == saved
    # a truncated checkpoint file (disk full, a copy cut short): one line from the ranks (not a
    # traceback each plus torchrun's report) naming the older checkpoint to fall back to
    kiln("train", small_recipe, "--set", "train.steps=4", "--set", "train.name=cut",
         "--set", "checkpoint.every=2")
    cut = tmp_path / "runs" / "cut" / "checkpoints"
    states = cut / "step_00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    one_error_line(kiln("train", small_recipe, "--set", "train.steps=6", "--set", "train.name=cut",
                        "--set", "checkpoint.every=2", check=False),
                   "step_00000004 cannot be loaded", "write step_00000002 into", "--no-resume")
    (cut / "latest").write_text("step_00000002")  # the fix the message names
    assert "from step_00000002" in kiln("train", small_recipe, "--set", "train.steps=6",
                                        "--set", "train.name=cut", "--set", "checkpoint.every=2").stdout
    assert (cut / "latest").read_text().strip() == "step_00000006"
    # run again as it stands: finished, so no ranks start and nothing is written
    lines = (cut.parent / "metrics.jsonl").read_text()
    res = kiln("train", small_recipe, "--set", "train.steps=6", "--set", "train.name=cut")
    assert "already finished step 6" in res.stdout and "raise train.steps" in res.stdout
    assert (cut.parent / "metrics.jsonl").read_text() == lines
    # corrupt prepared files: a copy of the cache with a truncated .bin, then a garbage .idx
    cache = tmp_path / "cache"
    shutil.copytree(kiln_home / "cache", cache)
    override = ["--set", f"data.cache_dir={cache}"]
    bins = sorted(cache.rglob("*.bin"))
    assert bins, "the data cache should hold indexed .bin files"
    data = bins[0].read_bytes()
    bins[0].write_bytes(data[: len(data) // 2])
    one_error_line(kiln("train", small_recipe, *override, "--set", "train.name=c1", check=False),
                   "corrupt", "kiln prepare")
    assert not (tmp_path / "runs" / "c1").exists()  # refused before anything was started
    assert bins[0].stat().st_size == len(data) // 2  # and the files were left as they were
    repaired = kiln("prepare", small_recipe, *override)  # the fix the message names
    assert "rebuilding" in repaired.stderr and bins[0].stat().st_size == len(data)
    shutil.rmtree(cache)
    shutil.copytree(kiln_home / "cache", cache)
    idx = sorted(cache.rglob("*.idx"))[0]
    idx.write_bytes(b"not an index" * 10)
    one_error_line(kiln("train", small_recipe, *override, "--set", "train.name=c2", check=False),
                   "corrupt")
    assert res.returncode == 0
