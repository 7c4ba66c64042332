"""The recipe: YAML (omegaconf) + `--set` overrides -> typed, validated dataclasses.

Each folder owns its section's dataclass; this module composes them, checks keys, types, choices
and ranges (declared as field metadata beside each field) against the schema, runs each section's
cross-field validate(), and turns every user mistake into one ConfigError line.
"""
import dataclasses
import difflib
import operator
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kiln.data.config import DataConfig
from kiln.growth.config import GrowthConfig
from kiln.kernels.config import KernelsConfig
from kiln.model.config import ModelConfig
from kiln.parallel.config import ParallelConfig
from kiln.slurm.config import SlurmConfig
from kiln.trainer.objectives.config import ObjectiveConfig
from kiln.trainer.optim import OptimConfig, ScheduleConfig
from kiln.trainer import yaml_bounds
from kiln.trainer.run_config import CheckpointConfig, LoggingConfig, TrainConfig


class ConfigError(Exception):
    """A recipe or override the user must fix; the message is one line."""


def check_vocab(model_vocab: int, tokenizer_vocab: int) -> None:
    """model.vocab_size (0 = sized from the tokenizer) must hold every token id of the data."""
    if 0 < model_vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={model_vocab} is smaller than the tokenizer's "
                          f"{tokenizer_vocab} tokens: set model.vocab_size to 0 (sized from the "
                          f"tokenizer) or to at least {tokenizer_vocab}")


@dataclass
class Recipe:
    """A whole training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the network"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "corpus, tokenizer, packing"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "the loss"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"help": "rank layout, ZeRO"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "AdamW"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "learning rate"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the run"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "saving"})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "monitoring"})
    kernels: KernelsConfig = field(default_factory=KernelsConfig, metadata={"help": "fused ops"})
    growth: GrowthConfig = field(default_factory=GrowthConfig, metadata={"help": "model growth"})
    slurm: SlurmConfig = field(default_factory=SlurmConfig, metadata={"help": "cluster allocation"})
    deepspeed: dict = field(default_factory=dict, metadata={
        "help": "raw DeepSpeed config keys merged over the generated config"})


def did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a section (mapping), got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (typing.Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is typing.Any:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and users: a float
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where} must be {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _alias(meta, value):
    """The value a field's "aliases" metadata maps `value` to (e.g. YAML true -> "on"), else `value`;
    an alias matches only a value of its own type, so 1 is not taken for true."""
    for alias, canonical in meta.get("aliases", {}).items():
        if type(alias) is type(value) and alias == value:
            return canonical
    return value


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a plain dict, checking keys, types, choices and ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key '{path}'{did_you_mean(str(key), fields)}")
        value = _coerce(_alias(fields[key].metadata, value), hints[key], path)
        choices = fields[key].metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{path} must be one of {choices}, got {value!r}"
                              f"{did_you_mean(str(value), map(str, choices))}")
        kwargs[key] = value
    obj = cls(**kwargs)
    _check_own(obj, where)  # subsections were checked when _coerce built them
    return obj


# Field metadata that bounds a number: key -> (test, symbol, interval bracket), lower bounds first;
# an optional "zero" note says what 0 means. A test holds every section to these keys.
RANGE_KEYS = {"min": (operator.ge, ">=", "["), "gt": (operator.gt, ">", "("),
              "max": (operator.le, "<=", "]"), "lt": (operator.lt, "<", ")")}


def _range_fault(meta, value) -> str:
    """Why `value` breaks the field's min/gt/max/lt metadata, as 'must ... (got v)'; '' if it fits."""
    bounds = [k for k in RANGE_KEYS if k in meta]
    if all(RANGE_KEYS[k][0](value, meta[k]) for k in bounds):  # NaN fails every bound
        return ""
    got = f"({meta['zero']}; got {value})" if "zero" in meta else f"(got {value})"
    if len(bounds) == 2:
        lo, hi = bounds
        return f"must lie in {RANGE_KEYS[lo][2]}{meta[lo]}, {meta[hi]}{RANGE_KEYS[hi][2]} {got}"
    return f"must be {RANGE_KEYS[bounds[0]][1]} {meta[bounds[0]]} {got}"


def _check_own(obj, where: str) -> None:
    """One section's own fields: metadata ranges first (validate() may divide by a field), then
    its cross-field validate(); any fault becomes one ConfigError line."""
    for f in dataclasses.fields(obj):
        fault = _range_fault(f.metadata, getattr(obj, f.name))
        if fault:
            raise ConfigError(f"{where}.{f.name} {fault}" if where else f"{f.name} {fault}")
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_section(obj, where: str) -> None:
    """Check a section built in code (e.g. `ModelConfig(...)`) as loading a recipe would, its
    subsections included; `where` is its recipe key, e.g. "model". Raises ConfigError."""
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            check_section(child, f"{where}.{f.name}" if where else f.name)
    _check_own(obj, where)


def _check_combination(r: Recipe) -> None:
    """Constraints that span sections."""
    if r.parallel.sp > 1:
        if r.train.nproc % r.parallel.sp:
            raise ConfigError(f"train.nproc ({r.train.nproc}) must be a multiple of parallel.sp "
                              f"({r.parallel.sp})")
        if r.data.seq_len % (2 * r.parallel.sp):
            raise ConfigError(f"data.seq_len ({r.data.seq_len}) must be divisible by 2 * parallel.sp "
                              f"= {2 * r.parallel.sp} for the zigzag layout")
    if r.train.compile == "on":
        from kiln.trainer.compile_policy import inapplicable  # one list of reasons for on and auto

        why = inapplicable(r)
        if why:
            raise ConfigError(f"train.compile=on does not apply to {why} yet (it supports dense models "
                              "with concat packing and parallel.sp=1): set train.compile=auto or off")
    if r.parallel.ep > 1:
        if r.model.mlp != "moe":
            raise ConfigError(f"parallel.ep={r.parallel.ep} shards MoE experts: set model.mlp=moe "
                              "or parallel.ep=1")
        if r.train.nproc % r.parallel.ep:
            raise ConfigError(f"train.nproc ({r.train.nproc}) must be a multiple of parallel.ep "
                              f"({r.parallel.ep})")
        experts = r.model.moe.num_experts * r.model.moe_layers
        if experts % r.parallel.ep:
            raise ConfigError(f"{experts} experts (num_experts x MoE layers) do not divide over "
                              f"parallel.ep={r.parallel.ep} ranks: memory balance needs a multiple")
    if r.parallel.placement != "contiguous":
        if r.parallel.ep == 1:
            raise ConfigError("parallel.placement applies to expert parallelism: set parallel.ep > 1 or "
                              "leave parallel.placement=contiguous")
        if r.parallel.placement != "auto" and not Path(r.parallel.placement).is_file():
            raise ConfigError(f"parallel.placement={r.parallel.placement!r} is neither contiguous, auto nor an "
                              "existing file: run `kiln place RUN_DIR` to write a placement.json")
    if r.objective.name in ("clm", "meap") and not r.model.causal:
        raise ConfigError(f"objective.name={r.objective.name} needs model.causal=true (an encoder would see the "
                          "tokens it predicts)")
    if r.objective.meap.sft:
        if r.objective.name != "meap":
            raise ConfigError(f"objective.meap.sft applies to objective.name=meap (not {r.objective.name}): "
                              "set objective.name=meap or remove objective.meap.sft")
        if not r.data.sft_file or not Path(r.data.sft_file).is_file():
            raise ConfigError(f"objective.meap.sft needs data.sft_file, a prompt/response jsonl (got "
                              f"{r.data.sft_file!r}): --set data.sft_file=PATH")
        if r.data.packing != "concat":
            raise ConfigError("objective.meap.sft trains on fixed-length prompt/response rows: use data.packing=concat")
    if r.objective.name in ("mlm", "electra") and r.model.causal:
        raise ConfigError(f"objective.name={r.objective.name} trains a bidirectional encoder: set model.causal=false")
    if r.parallel.sp > 1 and r.parallel.sp_impl == "ulysses":
        from kiln.parallel.ulysses import ulysses_refusal  # imports torch only when Ulysses is asked for

        why = ulysses_refusal(r.model.n_heads, r.model.kv_heads, r.parallel.sp)
        if why:
            raise ConfigError(why)
    if r.growth.op != "none":  # the small stage must be a valid recipe, growing inside the run
        from kiln.trainer.stages import stage_specs

        stage_specs(r, r.train.nproc)
    from kiln.trainer.batches import check_recipe  # data.packing=decompose, variable batches

    try:
        check_recipe(r)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_overrides(overrides) -> dict:
    """`a.b=c` strings -> nested dict, values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        check_yaml_size(raw, f"override '{key}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key '{key}' is not a dotted path like train.steps")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def _yaml_problem(e: Exception) -> str:
    """What is wrong and where (line, column), from a YAML error or one OmegaConf wraps."""
    err = e if isinstance(e, yaml.MarkedYAMLError) else getattr(e, "__cause__", None) or e
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        buf, ptr = getattr(mark, "buffer", None) or "", getattr(mark, "pointer", None)
        at = buf[ptr] if isinstance(ptr, int) and 0 <= ptr < len(buf) else ""
        if not at and Path(str(getattr(mark, "name", ""))).is_file():  # OmegaConf read a stream
            lines = Path(mark.name).read_text().splitlines()
            at = lines[mark.line][mark.column:mark.column + 1] if mark.line < len(lines) else ""
        hint = " (a tab: YAML indents with spaces)" if at == "\t" or "\t" in (err.problem or "") else ""
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}{hint}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_yaml_size(text: str, what: str):
    """kiln.trainer.yaml_bounds.check_yaml_size, its faults as ConfigError lines."""
    try:
        return yaml_bounds.check_yaml_size(text, what)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_yaml(path) -> dict:
    """Read a recipe file into a plain dict (interpolations resolved)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file '{path}' not found: pass a path such as recipes/tiny.yaml")
    try:
        if p.stat().st_size > yaml_bounds.MAX_RECIPE_BYTES:
            raise ConfigError(f"recipe '{path}' is {p.stat().st_size:,} bytes, more than a recipe needs "
                              f"({yaml_bounds.MAX_RECIPE_BYTES:,} at most): is it the right file?")
        text = p.read_text()
        if not text.strip():
            raise ConfigError(f"recipe '{path}' is empty: start from recipes/tiny.yaml")
        node = check_yaml_size(text, f"recipe '{path}'")
        if node is not None and not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"recipe '{path}' must be a mapping of sections (model:, data:, ...)")
        conf = OmegaConf.load(p)
        data = OmegaConf.to_container(conf, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections (model:, data:, ...)")
    return data


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` over `base` (dicts only; everything else is replaced)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Keys that moved or were renamed: (old section, old key) -> (new section, new key).
MOVED = {("train", key): ("parallel", key) for key in (
    "placement", "placement_every", "placement_time_limit", "placement_refine", "placement_async",
    "placement_min_balance", "profile_every")}
MOVED[("growth", "method")] = ("growth", "op")


def upgrade_moved(values: dict, saved: bool) -> dict:
    """Recipes written by kiln before a key moved (run dirs, checkpoints) are read as today's;
    a user's recipe gets one line naming the key's new place."""
    for (old, key), (new, new_key) in MOVED.items():
        section = values.get(old)
        if not isinstance(section, dict) or key not in section:
            continue
        if not saved:
            where = f"move it into the {new}: section" if new != old else "rename it"
            raise ConfigError(f"{old}.{key} is now {new}.{new_key}: {where} (or --set {new}.{new_key}=...)")
        values = merge(values, {old: {}})
        values[old] = {k: v for k, v in section.items() if k != key}
        values = merge(values, {new: {new_key: section[key]}})
    return values


# DeepSpeed's batch keys -> the kiln knob that owns each: kiln writes the batch part of DeepSpeed's
# config itself, so a raw key there would contradict it (and fail inside DeepSpeed's engine).
DEEPSPEED_BATCH_KEYS = {"train_batch_size": "global_batch", "train_micro_batch_size_per_gpu": "micro_batch",
                        "gradient_accumulation_steps": "grad_accum"}


def adopt_deepspeed_batch(values: dict) -> dict:
    """deepspeed.train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps, as a
    DeepSpeed user writes them, become train.global_batch / micro_batch / grad_accum (the same
    meaning: sequences per step over all ranks, per rank per micro-step, micro-steps per step);
    one line where the kiln knob is also set to another value."""
    ds = values.get("deepspeed")
    if not isinstance(ds, dict) or not any(k in ds for k in DEEPSPEED_BATCH_KEYS):
        return values
    train = values.get("train") if isinstance(values.get("train"), dict) else {}
    train = dict(train)
    for key, knob in DEEPSPEED_BATCH_KEYS.items():
        if key not in ds:
            continue
        value = ds[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"deepspeed.{key} must be a positive int, got {value!r}: kiln sets it from "
                              f"train.{knob}, so set that instead (--set train.{knob}=N)")
        if knob in train and train[knob] != value:
            raise ConfigError(f"deepspeed.{key}={value} contradicts train.{knob}={train[knob]}: kiln sets "
                              f"deepspeed.{key} from train.{knob}, so remove deepspeed.{key}")
        train[knob] = value
    # with train_batch_size, kiln derives grad_accum at the run's rank count and checks that a given
    # gradient_accumulation_steps agrees (trainer/batches.py::derive_grad_accum)
    return dict(values, train=train, deepspeed={k: v for k, v in ds.items() if k not in DEEPSPEED_BATCH_KEYS})


def from_dict(values: dict, saved: bool = False) -> Recipe:
    """Validate a plain dict into a Recipe (raises ConfigError). saved: a recipe kiln wrote
    itself (a run dir's or a checkpoint's), whose moved keys are upgraded."""
    recipe = _build(Recipe, adopt_deepspeed_batch(upgrade_moved(values, saved)), "")
    _check_combination(recipe)
    return recipe


def load_recipe(path, overrides=(), saved: bool = False) -> Recipe:
    """Load a recipe file, apply `--set` overrides, validate (saved: see from_dict)."""
    values = merge(load_yaml(path), parse_overrides(overrides))
    recipe = from_dict(values, saved)
    if not recipe.train.name:
        recipe.train.name = Path(path).stem
    return recipe


def to_dict(recipe) -> dict:
    """The resolved recipe as a plain dict (round-trips through from_dict)."""
    return dataclasses.asdict(recipe)


def to_yaml(recipe) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def reference_rows(cls=Recipe, prefix: str = ""):
    """(key, type, default, help) for every leaf field of the schema, in declaration order."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from reference_rows(tp, key + ".")
            continue
        help_ = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_ += " (" + " \\| ".join(map(str, f.metadata["choices"])) + ")"
        yield key, _type_name(tp), repr(getattr(defaults, f.name)), help_


def reference_markdown() -> str:
    """The recipe reference table, as the README shows it."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {t} | `{d}` | {h} |" for k, t, d, h in reference_rows()]
    return "\n".join(lines) + "\n"
