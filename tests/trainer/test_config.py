"""Recipes: round trip, overrides, every validation message, shipped recipes, README reference."""
import dataclasses
import typing
from pathlib import Path

import pytest

from kiln.model.config import ModelConfig, MoEConfig
from kiln.trainer.config import (RANGE_KEYS, ConfigError, Recipe, _range_fault, check_section, from_dict,
                                 load_recipe, parse_overrides, reference_markdown, to_dict, to_yaml)

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text), overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.train.name == path.stem


def test_round_trip(tmp_path):
    r = load_recipe(ROOT / "recipes/tiny.yaml", ["model.dim=128", "optim.lr=0.01"])
    again = load_recipe(write(tmp_path, to_yaml(r)))
    assert again == r
    assert from_dict(to_dict(r)) == r


def test_defaults_and_overrides(tmp_path):
    r = load_recipe(write(tmp_path, "train:\n  steps: 7\n"),
                    ["train.steps=9", "logging.wandb.mode=disabled", "optim.lr=1", "deepspeed.x.y=3"])
    assert r.train.steps == 9
    assert r.logging.wandb.mode == "disabled"
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float)  # ints are accepted as floats
    assert r.deepspeed == {"x": {"y": 3}}
    assert r.model == Recipe().model
    assert r.train.name == "r"


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x y"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x y"}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.steps"])


def test_unknown_key_suggests(tmp_path):
    assert error_of(tmp_path, "train:\n  stpes: 3\n") == "unknown key 'train.stpes' (did you mean 'steps'?)"
    assert "did you mean 'model'" in error_of(tmp_path, "modle:\n  dim: 3\n")
    assert "unknown key 'optim.learning_rate'" in error_of(tmp_path, "train: {}\n", ["optim.learning_rate=1"])


def test_wrong_type(tmp_path):
    assert error_of(tmp_path, "train:\n  steps: many\n") == "train.steps must be int, got str 'many'"
    assert "must be bool" in error_of(tmp_path, "model:\n  causal: 3\n")
    assert "must be a section" in error_of(tmp_path, "train: 5\n")
    assert "must be int, got bool" in error_of(tmp_path, "train:\n  steps: true\n")


def test_yaml_errors_name_line_and_column(tmp_path):
    assert error_of(tmp_path, "train:\n  steps: 3\n  steps: 4\n").endswith(
        "found duplicate key steps at line 3, column 3")
    assert error_of(tmp_path, "train:\n\tsteps: 3\n").endswith("at line 2, column 1 (a tab: YAML indents with spaces)")
    assert "did not find expected ',' or ']' at line 2" in error_of(tmp_path, "train: [1\n")


def test_exponent_floats_are_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; in a recipe or an override it means the float
    r = load_recipe(write(tmp_path, "optim:\n  lr: 3e-4\n"), ["optim.weight_decay=1E-2"])
    assert r.optim.lr == 3e-4 and r.optim.weight_decay == 1e-2
    assert "must be float, got str '1e-3x'" in error_of(tmp_path, "train: {}\n", ["optim.lr=1e-3x"])
    assert "must be int, got str '1e3'" in error_of(tmp_path, "train: {}\n", ["train.steps=1e3"])


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("on", "on"), ("off", "off"), ("true", "on"),
                                            ("false", "off"), ("yes", "on")])
def test_compile_takes_auto_on_off_and_the_yaml_booleans(tmp_path, value, expected):
    assert Recipe().train.compile == "auto"
    assert load_recipe(write(tmp_path, "train: {}\n"), [f"train.compile={value}"]).train.compile == expected
    assert load_recipe(write(tmp_path, f"train: {{compile: {value}}}\n")).train.compile == expected


def test_compile_refuses_other_values(tmp_path):
    assert error_of(tmp_path, "train: {compile: 1}\n") == "train.compile must be str, got int 1"
    assert "train.compile must be one of ['auto', 'on', 'off'], got 'fast'" in error_of(tmp_path, "train: {compile: fast}\n")
    # auto falls back to eager where compile does not apply (compile_policy says so at start)
    assert load_recipe(write(tmp_path, "train: {compile: auto}\nparallel: {sp: 2}\n")).train.compile == "auto"


def test_bad_choice(tmp_path):
    msg = error_of(tmp_path, "parallel:\n  sp_impl: tokenrng\n")
    assert "parallel.sp_impl must be one of ['tokenring', 'ring', 'ulysses']" in msg and "did you mean 'tokenring'" in msg


def test_impossible_combinations(tmp_path):
    assert "must be divisible by model.n_kv_heads" in error_of(tmp_path, "model:\n  n_heads: 4\n  n_kv_heads: 3\n")
    assert "divisible by model.n_heads" in error_of(tmp_path, "model:\n  dim: 30\n  n_heads: 4\n")
    assert "must be even for RoPE" in error_of(tmp_path, "model:\n  dim: 36\n  n_heads: 4\n")
    msg = error_of(tmp_path, "parallel:\n  sp: 2\ndata:\n  seq_len: 250\n")
    assert "data.seq_len (250) must be divisible by 2 * parallel.sp = 4" in msg
    assert "multiple of parallel.sp" in error_of(tmp_path, "parallel:\n  sp: 2\ntrain:\n  nproc: 3\n")
    assert "needs model.causal=true" in error_of(tmp_path, "model:\n  causal: false\n")
    assert error_of(tmp_path, "train: {compile: true}\nparallel: {sp: 2}\n") == (
        "train.compile=on does not apply to sequence parallelism yet (it supports dense models with "
        "concat packing and parallel.sp=1): set train.compile=auto or off")
    assert "does not apply to MoE" in error_of(tmp_path, "train: {compile: on}\nmodel: {mlp: moe}\n")
    assert "train.steps must be >= 1" in error_of(tmp_path, "train:\n  steps: 0\n")
    assert "parallel.placement_min_balance must lie in [0, 1] (got 1.5)" in error_of(
        tmp_path, "parallel:\n  placement_min_balance: 1.5\n")


@pytest.mark.parametrize("text,expected", [
    ("checkpoint: {every: -1}", "checkpoint.every must be >= 0 (0 = only at the end; got -1)"),
    ("checkpoint: {keep: -2}", "checkpoint.keep must be >= 0 (0 = keep all; got -2)"),
    ("train: {eval_every: -5}", "train.eval_every must be >= 0 (0 = only at the end; got -5)"),
    ("schedule: {warmup_steps: -1}", "schedule.warmup_steps must be >= 0 (got -1)"),
    ("model: {n_heads: 0}", "model.n_heads must be >= 1 (got 0)"),  # was a ZeroDivisionError
    ("model: {n_kv_heads: -1}", "model.n_kv_heads must be >= 0 (0 = derived; got -1)"),
    ("model: {norm_eps: 0}", "model.norm_eps must be > 0 (got 0.0)"),
    ("model: {rope_theta: -1}", "model.rope_theta must be > 0 (got -1.0)"),
    ("optim: {min_lr_ratio: 2}", "optim.min_lr_ratio must lie in [0, 1] (got 2.0)"),
    ("optim: {beta2: 1}", "optim.beta2 must lie in [0, 1) (got 1.0)"),
    ("optim: {grad_clip: -1}", "optim.grad_clip must be >= 0 (got -1.0)"),
    ("optim: {weight_decay: -0.1}", "optim.weight_decay must be >= 0 (got -0.1)"),
    ("optim: {eps: 0}", "optim.eps must be > 0 (got 0.0)"),
    ("objective: {z_loss: -1}", "objective.z_loss must be >= 0 (got -1.0)"),
    ("train: {threads: -2}", "train.threads must be >= 0 (0 = cores / local ranks; got -2)"),
])
def test_out_of_range_numbers(tmp_path, text, expected):
    """Each of these used to pass: a negative interval (x % -1 == 0 checkpointed every step;
    checkpoint.every=0 divided by zero in every rank, and now means only at the end, as for
    eval_every), n_heads=0 (a ZeroDivisionError), and optimizer values that train into NaN."""
    assert expected in error_of(tmp_path, text + "\n")
    assert load_recipe(write(tmp_path, "checkpoint: {every: 0, keep: 0}\n")).checkpoint.every == 0


@pytest.mark.parametrize("values,expected", [
    ({"data": {"seq_len": 0}}, "data.seq_len must be >= 1 (got 0)"),
    ({"data": {"heldout_percent": 100}}, "data.heldout_percent must lie in (0, 100) (got 100.0)"),
    ({"parallel": {"ep": 0}}, "parallel.ep must be >= 1 (got 0)"),
    ({"model": {"moe": {"every_n_layers": 0}}}, "model.moe.every_n_layers must be >= 1 (got 0)"),
    ({"parallel": {"placement_time_limit": 0}}, "parallel.placement_time_limit must be > 0 (got 0.0)"),
    ({"parallel": {"profile_every": -1}}, "parallel.profile_every must be >= 0 (0 = off; got -1)"),
    ({"optim": {"lr": float("nan")}}, "optim.lr must be > 0 (got nan)"),  # NaN fits no bound
])
def test_metadata_ranges_are_enforced_in_every_section(values, expected):
    """The min/gt/max/lt beside each field are checked by _build, for every section alike."""
    with pytest.raises(ConfigError) as e:
        from_dict(values)
    assert str(e.value) == expected


def test_check_section_checks_code_built_sections_and_ranges_before_validate():
    with pytest.raises(ConfigError, match=r"^model\.moe\.top_k must be >= 1 \(got 0\)$"):
        check_section(ModelConfig(moe=MoEConfig(top_k=0)), "model")
    with pytest.raises(ConfigError, match=r"^model\.n_heads must be >= 1"):  # before dim % n_heads
        check_section(ModelConfig(n_heads=0), "model")
    with pytest.raises(ConfigError, match="divisible by model.n_heads"):  # then validate()
        check_section(ModelConfig(dim=30), "model")
    check_section(Recipe(), "")  # every default lies in its own range


def _leaf_metadata(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_metadata(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.metadata


def test_range_metadata_uses_only_supported_keys():
    """A typo such as "mni" would silently disable a check: every metadata key must be known."""
    known = {"help", "choices", "zero", "aliases"} | set(RANGE_KEYS)
    ranged = 0
    for key, meta in _leaf_metadata(Recipe):
        assert set(meta) <= known, f"{key}: unsupported metadata {sorted(set(meta) - known)}"
        assert not {"min", "gt"} <= set(meta) and not {"max", "lt"} <= set(meta), key
        assert all(isinstance(meta[k], (int, float)) for k in RANGE_KEYS if k in meta), key
        assert "zero" not in meta or "min" in meta, f"{key}: a zero note needs a min"
        ranged += any(k in meta for k in RANGE_KEYS)
    assert ranged >= 40  # the walk reaches the sections' ranged fields
    assert _range_fault({"max": 4}, 5) == "must be <= 4 (got 5)"  # one-sided upper bounds
    assert _range_fault({"lt": 1, "zero": "0 = off"}, 1) == "must be < 1 (0 = off; got 1)"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    assert "is empty" in error_of(tmp_path, "")
    assert "not valid YAML" in error_of(tmp_path, "model: [unclosed\n")
    assert "must be a mapping" in error_of(tmp_path, "- a\n- b\n")


def test_readme_reference_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "README recipe reference drifted: paste `kiln config --reference`"


def test_moved_keys_name_their_new_place_and_saved_recipes_upgrade(tmp_path):
    """Expert placement moved from train: to parallel:. A user's recipe gets one line naming the
    new key; a recipe kiln saved before the move (run dir, checkpoint) loads as today's."""
    assert error_of(tmp_path, "train:\n  placement: auto\n") == (
        "train.placement is now parallel.placement: move it into the parallel: section "
        "(or --set parallel.placement=...)")
    assert "train.profile_every is now parallel.profile_every" in error_of(
        tmp_path, "model: {mlp: moe}\n", ["train.profile_every=4"])
    old = {"model": {"mlp": "moe"}, "parallel": {"ep": 2},
           "train": {"nproc": 2, "profile_every": 5, "placement": "auto", "placement_every": 3}}
    r = from_dict(old, saved=True)
    assert (r.parallel.profile_every, r.parallel.placement, r.parallel.placement_every) == (5, "auto", 3)
    assert r.train.nproc == 2 and old["train"]["profile_every"] == 5  # the caller's dict is untouched
