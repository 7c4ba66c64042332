"""Seeded hostile-input fuzzing (issue #19, items 7 and 13): every case ends in one `kiln: error:` line
and exit 2, or is accepted as valid; never a traceback, a hang or a touched checkpoint.

Most cases run in this process through kiln.trainer.cli.main (a subprocess costs seconds of CPU);
one short real run gives the cases that need a trained checkpoint. bench/fuzz.py runs many more.
"""
import hashlib
import random
import shutil
from pathlib import Path

import pytest

from kiln.trainer.config import ConfigError, load_recipe
from tests.fuzz import mutations as M
from tests.fuzz.hostile import Result, classify, failures, report, run_case
from tests.fuzz.mounts import mounted_tmpfs, read_only_bind
from tests.trainer.conftest import kiln

SEED = 0


def recipe_results(tmp: Path, rng: random.Random, n_recipes: int, n_overrides: int) -> list:
    """Run mutated recipes and overrides through `kiln config` (the loader every command uses); an
    accepted one then meets `kiln train`'s memory check before launch (huge sizes land there)."""
    from kiln.trainer.commands.train import check_memory

    results = []
    base = tmp / "base.yaml"
    base.write_text(M._dump(M.base(tmp / "cache", tmp / "runs")))
    cases = [(n, k, p, []) for n, k, p in M.recipe_cases(rng, n_recipes, tmp / "cache", tmp / "runs")]
    cases += [(n, k, None, sets) for n, k, sets in M.override_cases(rng, n_overrides)]
    for i, (name, kind, payload, sets) in enumerate(cases):
        path = base
        if payload is not None:
            path = tmp / f"r{i}.yaml"
            path.write_bytes(payload if isinstance(payload, bytes) else payload.encode())
        argv = ["config", path] + [a for s in sets for a in ("--set", s)]
        r = run_case(name, kind, argv)
        if r.outcome == "accepted":
            try:
                check_memory(load_recipe(path, sets))
            except ConfigError as e:
                r = Result(name, kind, "refused", 2, [f"kiln: error: {e}"], r.seconds, "memory check")
            except Exception as e:  # noqa: BLE001 - a crash of the check is a finding
                r = Result(name, kind, "crash", None, [], r.seconds, f"check_memory: {type(e).__name__}: {e}")
        results.append(r)
    return results


def test_mutated_recipes_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the python-tag payload would `touch PAYLOAD` here
    results = recipe_results(tmp_path, random.Random(SEED), 24, 12)
    print("\n" + report(results))
    assert not failures(results), "\n".join(failures(results))
    assert len(results) > 100
    refused = {r.name: r.lines[0] for r in results if r.outcome == "refused"}
    assert not (tmp_path / "PAYLOAD").exists()  # a !!python tag is never constructed
    for name in ("billion laughs 9x9", "billion laughs 6x20", "structural: self alias"):
        assert "expands to more than 10,000 values through YAML aliases" in refused[name]
    assert "line 2, column 1" in refused["structural: tab indent"] and "a tab" in refused["structural: tab indent"]
    assert "line 2, column 1" in refused["structural: duplicate key"]
    assert "nests lists or mappings too deeply" in refused["structural: deep nesting"]
    assert "must be a mapping of sections" in refused["structural: top-level scalar"]
    assert "needs about" in refused["--set model.dim=100000"] and "--no-memory-check" in refused["--set model.dim=100000"]
    slowest = max(results, key=lambda r: r.seconds)
    assert slowest.seconds < 10, slowest.describe()  # no case is near a hang


def _corpus_recipe(tmp: Path, source, cache: Path) -> Path:
    values = M.base(cache, tmp / "runs")
    values["data"].update(source=str(source), vocab_size=300, seq_len=16, heldout_percent=20.0, num_workers=0)
    values["data"].pop("max_documents")
    p = tmp / f"recipe_{Path(str(source)).name}.yaml"
    p.write_text(M._dump(values))
    return p


@pytest.mark.slow
def test_hostile_corpora(tmp_path):
    """Empty corpora, 0-byte and non-UTF-8 files, malformed .jsonl/.parquet, too little text."""
    results = []
    for i, (name, kind, files) in enumerate(M.corpus_cases()):
        src = tmp_path / f"corpus{i}"
        src.mkdir()
        for fname, data in files.items():
            (src / fname).write_bytes(data)
        results.append(run_case(name, kind, ["prepare", _corpus_recipe(tmp_path, src, tmp_path / "cache")], 60))
    print("\n" + report(results))
    assert not failures(results), "\n".join(failures(results))
    out = {r.name: r for r in results}
    # a few empty or 0-byte files among good ones are dropped, not fatal
    for name in ("a 0-byte file among good ones", "an empty document among good ones"):
        assert out[name].outcome == "accepted", out[name].describe()
    assert "bad.txt" in out["non-UTF-8 among good ones"].lines[0]
    assert "raise data.heldout_percent" not in out["too little text"].lines[0]


@pytest.mark.slow
def test_damaged_token_files_and_full_or_read_only_storage(tmp_path):
    """Truncated and bit-flipped .bin/.idx files of a prepared folder; a cache on a full tmpfs and on a
    read-only mount."""
    src = tmp_path / "corpus"
    src.mkdir()
    for name, data in M.corpus_cases()[3][2].items():  # the good documents
        (src / name).write_bytes(data)
    recipe = _corpus_recipe(tmp_path, src, tmp_path / "cache")
    first = run_case("prepare", "setup", ["prepare", recipe], 120)
    assert first.outcome == "accepted", first.describe()
    (folder,) = (tmp_path / "cache").glob("data-*")
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)
    rng, results = random.Random(SEED), []
    targets = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".idx"))
    for i in range(12):
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        target = folder / targets[i % len(targets)]
        how = M.flip_bits(rng, target, rng.choice([1, 8])) if i % 2 else M.truncate(rng, target)
        # `kiln train` opens the cache without repairing it: it must refuse before starting ranks
        # (a run dir of its own each: a failed in-process `kiln train` keeps its run-dir lock until exit)
        r = run_case(how, "token-files", ["train", recipe, "--set", f"train.name=damaged{i}"], 60)
        results.append(r)
        assert r.outcome != "refused" or "is corrupt" in r.lines[0], r.describe()
    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    with mounted_tmpfs(tmp_path / "small", "48k") as small:
        results.append(run_case("cache on a full tmpfs", "storage/full-disk",
                                ["prepare", _corpus_recipe(tmp_path, src, small / "cache")], 60))
        assert "no space left" in (results[-1].lines or [""])[0], results[-1].describe()
    with read_only_bind(tmp_path / "cache", tmp_path / "ro") as ro:
        results.append(run_case("cache on a read-only mount", "storage/read-only",
                                ["prepare", _corpus_recipe(tmp_path, src, ro / "elsewhere")], 60))
        line = (results[-1].lines or [""])[0]
        assert "not a writable folder" in line and "free space" not in line, results[-1].describe()
    print("\n" + report(results))
    assert not failures(results), "\n".join(failures(results))
    assert all(r.outcome == "refused" for r in results), "\n".join(r.describe() for r in results)


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_trained_run_cases(trained_run, tmp_path):
    """The shared short real run; then a checkpoint of another shape, a read-only run dir and a disk
    that fills up during a save: one line each, and the checkpoints are byte for byte as they were."""
    small_recipe, run, _, _ = trained_run
    assert "kiln: run dir" in (run / "console.log").read_text()
    before = _tree_digest(run / "checkpoints")
    results = []
    for change in ("model.dim=96", "model.n_layers=3", "model.n_kv_heads=4"):
        results.append(run_case(f"resume with {change}", "checkpoint/other-shape",
                                ["train", small_recipe, "--nproc", "1", "--set", change], 120))
    lines = [r.lines[0] if r.lines else r.describe() for r in results]
    assert all("but the recipe says" in ln for ln in lines), lines
    console = (run / "console.log").read_text()
    assert console.count("kiln: run dir") == 1 and "has model.dim=64 but the recipe says 96" in console
    with read_only_bind(run, run) as _:
        results.append(run_case("resume in a read-only run dir", "storage/read-only",
                                ["train", small_recipe, "--nproc", "1", "--set", "train.steps=4"], 120))
        line = (results[-1].lines or [""])[0]
        assert "not writable" in line and "free space" not in line, results[-1].describe()
    assert _tree_digest(run / "checkpoints") == before
    # a full disk during the next save: the run dir moved onto a tmpfs just big enough for what it holds
    used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    with mounted_tmpfs(tmp_path / "full", f"{used // 1024 + 600}k") as full:
        shutil.copytree(run, full / "small")
        recipe = tmp_path / "full.yaml"
        recipe.write_text(small_recipe.read_text().replace(str(run.parent), str(full)))
        res = kiln("train", recipe, "--nproc", "1", "--set", "train.steps=4", "--set", "checkpoint.every=1",
                   "--set", "logging.wandb.mode=disabled", check=False, timeout=300)
        r = classify("disk fills during a save", "storage/full-disk", res.returncode, res.stdout, res.stderr,
                     None, 0.0)
        results.append(r)
        assert r.outcome == "refused" and "saving checkpoint" in r.lines[0], r.describe()
        ckpts = full / "small" / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == "step_00000002"
        assert _tree_digest(ckpts / "step_00000002") == {k.split("/", 1)[1]: v for k, v in before.items()
                                                          if k.startswith("step_00000002/")}
    print("\n" + report(results))
    assert not failures(results), "\n".join(failures(results))
    assert all(r.outcome == "refused" for r in results), "\n".join(r.describe() for r in results)


def test_deepspeed_batch_keys_are_honoured_or_refused_naming_the_kiln_knob():
    from kiln.trainer.batches import derive_grad_accum
    from kiln.trainer.config import from_dict

    r = from_dict({"train": {"micro_batch": 4, "nproc": 2}, "data": {"seq_len": 64},
                   "deepspeed": {"train_batch_size": 32, "gradient_clipping": 0.5}})
    assert r.train.global_batch == 32 and r.deepspeed == {"gradient_clipping": 0.5}
    assert derive_grad_accum(r, 2) == 4  # 32 sequences = 4 micro-batches of 4 on 2 ranks
    with pytest.raises(ConfigError, match=r"deepspeed.train_micro_batch_size_per_gpu=3 contradicts "
                                          r"train.micro_batch=4: .* remove deepspeed.train_micro_batch_size_per_gpu"):
        from_dict({"train": {"micro_batch": 4}, "deepspeed": {"train_micro_batch_size_per_gpu": 3}})
    with pytest.raises(ConfigError, match=r"deepspeed.train_batch_size must be a positive int, got 'x': .*"
                                          r"--set train.global_batch=N"):
        from_dict({"deepspeed": {"train_batch_size": "x"}})
