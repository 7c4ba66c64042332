"""Checkpoints: DeepSpeed's engine state plus kiln's own (RNG, recipe, and the state of the parts).

Layout: <run_dir>/checkpoints/step_00000100/... with a `latest` file naming the newest complete
one. A save writes kiln's files and DeepSpeed's (save_latest=False), then rank 0, once every rank
is done, writes the manifest (every file's size and sha256, kiln.infer.checkpoint_manifest) and
only then moves `latest` (written under a temporary name and renamed: DeepSpeed's own `latest` is
opened, truncated and then written, so a kill there would leave it empty). A run killed anywhere
in a save resumes from the previous checkpoint; a resume checks the manifest before any file is
opened (kiln.trainer.manifest picks the checkpoint, checkpoint.fallback the way back). With
checkpoint.async the same happens with DeepSpeed's writes in the background
(kiln.trainer.checkpoint_async). kiln's own files hold tensors and plain values only and load
with weights_only=True.

What kiln saves beside the engine is collected from the components that own it, the *parts*
of a stage (`parts={name: part}`), each with any of:
  * `state_dict() -> dict` / `load_state_dict(dict)`: JSON state, stored under its name in
    kiln_state.json and in DeepSpeed's client state (the loop's progress: step, tokens);
  * `save_files(tag_dir)` / `load_files(tag_dir)`: files of its own (every rank calls them:
    expert-parallel banks are saved by (layer, expert), see kiln.parallel.expert_state);
  * `load_module(src, dst)`: DeepSpeed's custom_load_fn for the module weights (at most one part).
"""
import contextlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import yaml

from kiln.data.errors import storage_message
from kiln.infer.checkpoint_manifest import ManifestError, verify_manifest, write_manifest
from kiln.trainer.errors import CheckpointError  # noqa: F401 (defined without torch, for the CLI)

# torch is imported inside the functions that use it: the `kiln` CLI reads run folders through this
# module (latest_tag, saved_recipe, check_compatible) without paying torch's import


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(run_dir: Path) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    f = ckpt_root(run_dir) / "latest"
    return f.read_text().strip() if f.is_file() else None


def drop_unfinished(run_dir: Path, since: float) -> None:
    """Remove checkpoint folders newer than `latest` that were written to after `since`: saves
    this run began and did not finish. For `kiln train` once every rank has exited (a rank that
    fails mid-save cannot do it: another rank may still be creating the folder). Folders from
    before `since` stay, e.g. a damaged one the user stepped back from by editing `latest`."""
    latest = latest_tag(run_dir)
    newest = int(latest[5:]) if latest and latest[5:].isdigit() else -1
    for d in ckpt_root(run_dir).glob("step_*"):
        if d.is_dir() and d.name[5:].isdigit() and int(d.name[5:]) > newest and d.stat().st_mtime >= since:
            shutil.rmtree(d, ignore_errors=True)


def saved_recipe(run_dir: Path) -> dict | None:
    """The recipe (plain dict) stored with the newest checkpoint, or None if there is none."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    f = ckpt_root(run_dir) / tag / "kiln_recipe.yaml"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {f.parent} is incomplete (no kiln_recipe.yaml): write the tag of an "
                              f"older complete checkpoint into {f.parent.parent / 'latest'}, or run with --no-resume")
    try:
        return yaml.safe_load(f.read_text())
    except yaml.YAMLError:
        raise CheckpointError(f"{f} is corrupt: run with --no-resume to start over") from None


def upgrade_state(state: dict) -> dict:
    """kiln's checkpoint state in today's form: {part name: state}. Checkpoints saved before the
    parts existed hold the loop's {"step", "tokens"} alone."""
    if "progress" not in state and "step" in state:
        return {"progress": state}
    return state


def saved_state(run_dir: Path) -> dict | None:
    """kiln's state (kiln_state.json) of the newest checkpoint, or None if there is none."""
    tag = latest_tag(run_dir)
    f = ckpt_root(run_dir) / tag / "kiln_state.json" if tag else None
    if f is None or not f.is_file():
        return None
    try:
        return upgrade_state(json.loads(f.read_text()))
    except ValueError:
        raise CheckpointError(f"{f} is corrupt: {_way_out(run_dir, tag)}") from None


# the data keys that decide which corpus and tokenizer the token ids come from
DATA_IDENTITY = ("source", "text_field", "text_unit", "tokenizer", "vocab_size", "max_documents", "heldout_percent")


def check_compatible(run_dir: Path, recipe_dict: dict) -> None:
    """Refuse to resume a checkpoint whose model (or world layout) differs from the recipe."""
    old = saved_recipe(run_dir)
    if old is None:
        return
    for key, new_value in recipe_dict["model"].items():
        old_value = old.get("model", {}).get(key)
        if old_value != new_value:
            raise CheckpointError(
                f"checkpoint in {run_dir} has model.{key}={old_value!r} but the recipe says "
                f"{new_value!r}: use another train.name, or --no-resume to start over")
    for key in DATA_IDENTITY:  # another corpus or tokenizer: the same ids would mean other text
        old_value, new_value = old.get("data", {}).get(key), recipe_dict.get("data", {}).get(key)
        if key in old.get("data", {}) and old_value != new_value:
            raise CheckpointError(
                f"checkpoint in {run_dir} was trained with data.{key}={old_value!r} but the recipe says "
                f"{new_value!r} (another corpus or tokenizer): use another train.name, or --no-resume to start over")


def save(engine, run_dir: Path, step: int, parts: dict, recipe_dict: dict, keep: int,
         background: bool = False, timeout_s: float = 600.0) -> Path:
    """Save engine + the parts' state for `step` (collective: every rank calls it); publish it
    (manifest, then `latest`) and prune old ones. `background`: DeepSpeed's files are written by
    a thread and published when every rank is done (kiln.trainer.checkpoint_async)."""
    import torch
    import torch.distributed as dist
    from kiln.trainer import checkpoint_async

    root, tag = ckpt_root(run_dir), tag_for(step)
    rank = dist.get_rank()
    checkpoint_async.wait()  # one save at a time: a pending background save finishes first
    state = {name: part.state_dict() for name, part in parts.items() if hasattr(part, "state_dict")}
    if rank == 0 and (root / tag).is_dir() and tag != latest_tag(run_dir):
        # a folder left by a killed save, or a damaged one the run stepped back from: its files
        # must not end up in this save's manifest
        shutil.rmtree(root / tag, ignore_errors=True)
    dist.barrier()
    with _writing(run_dir, tag):
        (root / tag).mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), root / tag / f"rng_rank{rank}.pt")
        if rank == 0:
            (root / tag / "kiln_recipe.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
            (root / tag / "kiln_state.json").write_text(json.dumps(state))
        for part in parts.values():
            if hasattr(part, "save_files"):
                part.save_files(root / tag)
    # no barrier here: nothing reads kiln's files before publish(), which waits for every rank
    client = {"kiln": state}
    if background:
        with _writing(run_dir, tag):
            writes = checkpoint_async.capture(engine, str(root), tag, client)
        checkpoint_async.start(writes, root / tag, lambda: publish(run_dir, tag, keep, announce=True), timeout_s)
        return root / tag
    with _writing(run_dir, tag):
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    dist.barrier()
    if rank == 0:
        publish(run_dir, tag, keep)
    dist.barrier()
    return root / tag


def publish(run_dir: Path, tag: str, keep: int, announce: bool = False) -> None:
    """Rank 0, once every rank's files of `tag` are on disk: write its manifest, then point
    `latest` at it, then prune older checkpoints beyond `keep`."""
    root = ckpt_root(run_dir)
    with _writing(run_dir, tag):
        _test_pause(tag, "before its manifest")
        write_manifest(root / tag)
        _test_pause(tag, "before `latest`")
        set_latest(run_dir, tag)
    if keep > 0:
        # only older tags are pruned: a folder newer than this save (a damaged checkpoint the user
        # stepped back from) is neither counted nor deleted
        older = sorted(p.name for p in root.glob("step_*") if p.is_dir() and p.name < tag)
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(root / old, ignore_errors=True)
    if announce:
        print(f"kiln: checkpoint {root / tag} (written in the background)", flush=True)


def _test_pause(tag: str, where: str) -> None:
    """KILN_TEST_SAVE_PAUSE_S: sleep inside a save (after every rank's files, before the manifest,
    and before `latest`), saying so, so that the kill -9 test can land a kill exactly there."""
    import os
    import time

    pause = float(os.environ.get("KILN_TEST_SAVE_PAUSE_S", "0") or 0)
    if pause > 0:
        print(f"kiln: test: inside save {tag}, {where}", flush=True)
        time.sleep(pause)


def set_latest(run_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` atomically: a temporary file, flushed, renamed over it."""
    import os

    from kiln.data.manifest import fsync_dir

    root = ckpt_root(run_dir)
    tmp = root / f".latest.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(root / "latest")
    fsync_dir(root)


@contextlib.contextmanager
def _writing(run_dir: Path, tag: str):
    """A write that fails (full disk, quota, file size limit: torch.save reports these as
    RuntimeError) becomes one line; the half-written tag goes, and `latest` still names the
    previous checkpoint, which is complete."""
    import torch.distributed as dist
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, dist.DistError) or "/gloo/" in str(e) or "Connection closed by peer" in str(e):
            raise  # another rank failed (and said why): not this rank's write
        free = shutil.disk_usage(ckpt_root(run_dir)).free / 2**30
        if not (_storage_failure(e) or free < 1):
            raise  # not a refused write: a traceback is the honest report
        previous = latest_tag(run_dir)
        if previous != tag:  # best effort: `kiln train` removes what another rank creates after
            shutil.rmtree(ckpt_root(run_dir) / tag, ignore_errors=True)
        cause = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"saving checkpoint {tag} in {ckpt_root(run_dir)} failed ({free:.1f} GiB free there; "
            f"{cause}): free space or point train.run_root elsewhere, then run the same command to "
            f"resume from {previous or 'the start'}") from None


def _storage_failure(e: BaseException) -> bool:
    """A write the machine refused: an OSError with a storage errno, or torch.save's RuntimeError
    for one (its stream reports a failed write, not the errno)."""
    if isinstance(e, OSError):
        return storage_message(e) is not None
    text = str(e)
    return any(k in text for k in ("iostream error", "file write failed", "unexpected pos", "No space left",
                                    "File too large", "Disk quota"))


def load(engine, run_dir: Path, parts: dict) -> dict | None:
    """Restore the newest checkpoint into `engine` and the parts; returns kiln's state, or None
    if there is no checkpoint. Its files are checked against its manifest first: DeepSpeed
    unpickles its own files in full, so it is handed only files whose checksums verify."""
    import torch.distributed as dist
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    try:
        verify_manifest(ckpt_root(run_dir) / tag)  # False (no manifest, older kiln): kiln train has warned
    except ManifestError as e:
        raise CheckpointError(f"checkpoint {ckpt_root(run_dir) / tag} cannot be loaded: {e}: "
                              f"{_way_out(run_dir, tag)}") from None
    _check_partitions(engine, ckpt_root(run_dir) / tag)
    module_loaders = [part.load_module for part in parts.values() if hasattr(part, "load_module")]
    try:
        path, client = engine.load_checkpoint(str(ckpt_root(run_dir)), tag=tag,
                                              custom_load_fn=module_loaders[0] if module_loaders else None)
        for part in parts.values():
            if path is not None and hasattr(part, "load_files"):
                part.load_files(ckpt_root(run_dir) / tag)
        rng = ckpt_root(run_dir) / tag / f"rng_rank{dist.get_rank()}.pt"
        if path is not None and rng.is_file():
            _set_rng_state(_load_rng(rng))
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or damaged file: say which, and how to go on
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise CheckpointError(f"checkpoint {ckpt_root(run_dir) / tag} cannot be loaded "
                              f"({type(e).__name__}: {first}): {_way_out(run_dir, tag)}") from None
    if path is None or "kiln" not in (client or {}):
        raise CheckpointError(f"checkpoint {ckpt_root(run_dir) / tag} could not be loaded: "
                              f"{_way_out(run_dir, tag)}")
    state = upgrade_state(client["kiln"])
    for name, part in parts.items():
        if hasattr(part, "load_state_dict"):
            part.load_state_dict(state.get(name, {}))
    return state


def _check_partitions(engine, tag_dir: Path) -> None:
    """ZeRO 1-3 partition the optimizer over the data-parallel ranks, one file each, and
    DeepSpeed 0.19.8 reads a rigid checkpoint by this rank's index alone: another data-parallel
    size would load a wrong share (fewer ranks) or fail (more). Refused in one line; ZeRO 0's one
    file holds everything and reshards freely (docs/reliability.md)."""
    saved = len(list(tag_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")))
    now = getattr(engine, "dp_world_size", None)
    if saved and now and saved != now and getattr(engine, "zero_optimization_stage", lambda: 0)() >= 1:
        raise CheckpointError(
            f"checkpoint {tag_dir} holds ZeRO optimizer partitions of {saved} data-parallel ranks but this run has "
            f"{now}: resume it with {saved} (train.nproc); runs of parallel.zero_stage=0 resume on any number")


def _way_out(run_dir: Path, tag: str) -> str:
    """The fix for an unloadable newest checkpoint: an older one if there is (the newest whose
    manifest verifies, else the newest older folder), else start over."""
    from kiln.trainer.manifest import newest_verified

    older = sorted(p.name for p in ckpt_root(run_dir).glob("step_*") if p.is_dir() and p.name < tag)
    good = newest_verified(run_dir, below=tag) or (older[-1] if older else None)
    back = (f"write {good} into {ckpt_root(run_dir) / 'latest'} to resume from the one before, "
            "or " if good else "")
    return back + "run with --no-resume to start over (the old run is moved aside)"


def _rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    import torch
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng(path: Path) -> dict:
    """An RNG file, never unpickling code: weights_only=True; the numpy arrays of files saved by
    an older kiln are let through torch's allow-list (array reconstruction runs no file code)."""
    import torch
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _set_rng_state(state: dict) -> None:
    import torch
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
