"""Remote code (issue #19, item 9): a dataset repository's own loading script never runs unless the
recipe sets data.trust_remote_code (default false), and kiln passes the flag explicitly to the
`datasets` versions that have it. Each script here would write a marker file if it ran."""
import types

import yaml

from kiln.data.config import DataConfig
from kiln.data.sources import remote_code_kwargs
from tests.fuzz.hostile import run_case

SCRIPT = '''
import pathlib
pathlib.Path({marker!r}).write_text("the dataset script ran")
import datasets


class Evil(datasets.GeneratorBasedBuilder):
    def _info(self):
        return datasets.DatasetInfo(features=datasets.Features({{"text": datasets.Value("string")}}))

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name="train")]

    def _generate_examples(self):
        yield 0, {{"text": "hello"}}
'''


def _hub_style_repo(tmp_path):
    """A folder laid out like a hub dataset repository whose loader is a script."""
    repo, marker = tmp_path / "evil_dataset", tmp_path / "RAN"
    repo.mkdir()
    (repo / "evil_dataset.py").write_text(SCRIPT.format(marker=str(marker)))
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    return repo, marker


def _recipe(tmp_path, source, **data):
    values = {"data": {"source": str(source), "vocab_size": 300, "seq_len": 16, "heldout_percent": 20.0,
                       "num_workers": 0, "cache_dir": str(tmp_path / "cache"), **data},
              "train": {"run_root": str(tmp_path / "runs")}, "logging": {"wandb": {"mode": "disabled"}}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(values))
    return p


def test_a_dataset_script_does_not_run_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the repo is local: no network wanted
    repo, marker = _hub_style_repo(tmp_path)
    r = run_case("hub-style script", "remote-code", ["prepare", _recipe(tmp_path, f"hf:{repo}")], 60)
    assert r.outcome == "refused" and "cannot load hub dataset" in r.lines[0], r.describe()
    assert not marker.exists()


def test_trust_remote_code_true_is_refused_where_datasets_runs_no_scripts(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo, marker = _hub_style_repo(tmp_path)
    r = run_case("hub-style script, trusted", "remote-code",
                 ["prepare", _recipe(tmp_path, f"hf:{repo}", trust_remote_code=True)], 60)
    assert int(datasets.__version__.split(".")[0]) >= 4  # the installed one: scripts are gone
    assert r.outcome == "refused" and "data.trust_remote_code=true" in r.lines[0], r.describe()
    assert not marker.exists()


def test_a_script_in_a_local_corpus_folder_is_not_a_document_and_never_runs(tmp_path):
    repo, marker = _hub_style_repo(tmp_path)
    for i in range(20):
        (repo / f"doc{i}.txt").write_text(f"Plain document number {i} about glazes and kilns. " * 20)
    r = run_case("script beside text files", "remote-code", ["prepare", _recipe(tmp_path, repo)], 120)
    assert r.outcome == "accepted", r.describe()
    assert not marker.exists()


def test_the_flag_is_passed_explicitly_to_datasets_versions_that_take_it():
    old = types.SimpleNamespace(__version__="3.2.0")  # datasets 3.x: the version string is all that is read
    assert remote_code_kwargs(DataConfig(), old) == {"trust_remote_code": False}
    assert remote_code_kwargs(DataConfig(trust_remote_code=True), old) == {"trust_remote_code": True}
    new = types.SimpleNamespace(__version__="5.2.0")
    assert remote_code_kwargs(DataConfig(), new) == {}
