"""The run directory guards of `kiln train` that protect what is already saved: checkpoints
without a `latest` file are never trained over from step 0, and train.name stays inside run_root."""
import pytest

from kiln.trainer.checkpoint import CheckpointError
from kiln.trainer.config import ConfigError, Recipe, from_dict, to_dict
from kiln.trainer.run_dir import COMPLETE, prepare_run_dir


def _checkpoint(run_dir, tag, complete=True):
    d = run_dir / "checkpoints" / tag
    d.mkdir(parents=True)
    for f in COMPLETE[: None if complete else 1]:
        (d / f).write_text("x")


def test_checkpoints_without_latest_are_not_trained_over(tmp_path):
    run = tmp_path / "runs" / "r"
    _checkpoint(run, "step_00000004")
    _checkpoint(run, "step_00000008")
    _checkpoint(run, "step_00000012", complete=False)  # a save killed half-way
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(CheckpointError) as e:
        prepare_run_dir(Recipe(), run, no_resume=False, launched=True)
    msg = str(e.value)
    assert "no `latest` file" in msg and "step_00000008" in msg and "--no-resume" in msg and "\n" not in msg
    assert (run / "checkpoints" / "step_00000004").is_dir() and (run / "metrics.jsonl").is_file()  # untouched
    assert prepare_run_dir(Recipe(), run, no_resume=True, launched=True)  # moved aside, not deleted
    assert not run.exists() and len(list((tmp_path / "runs").glob("r.prev-*"))) == 1


def test_only_an_unfinished_first_save_starts_over(tmp_path):
    run = tmp_path / "runs" / "r"
    _checkpoint(run, "step_00000004", complete=False)
    assert prepare_run_dir(Recipe(), run, no_resume=False, launched=True)


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/tmp/x", "~x"])
def test_train_name_stays_inside_run_root(name):
    values = to_dict(Recipe())
    values["train"]["name"] = name
    with pytest.raises(ConfigError, match="plain folder name"):
        from_dict(values)


def test_resuming_on_another_corpus_or_tokenizer_is_refused(tmp_path):
    import yaml

    run = tmp_path / "runs" / "r"
    _checkpoint(run, "step_00000004")
    saved = to_dict(Recipe())
    (run / "checkpoints" / "step_00000004" / "kiln_recipe.yaml").write_text(yaml.safe_dump(saved))
    (run / "checkpoints" / "latest").write_text("step_00000004")
    assert prepare_run_dir(Recipe(), run, no_resume=False, launched=True)  # the same data resumes
    for key, value in (("source", "/data/other"), ("vocab_size", 8192), ("tokenizer", "tok.json")):
        r = Recipe()
        setattr(r.data, key, value)
        with pytest.raises(CheckpointError, match=f"data.{key}=.*another corpus or tokenizer"):
            prepare_run_dir(r, run, no_resume=False, launched=True)
