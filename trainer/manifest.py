"""Which checkpoint a run resumes from, by the checkpoints' manifests (kiln.infer.checkpoint_manifest).

`kiln train` calls `resume_tag` before any rank starts (kiln.trainer.run_dir):
  * `latest` names a checkpoint whose files match its manifest: that one;
  * it fails its manifest: refused in one line naming the bad file and the previous verified
    checkpoint; with checkpoint.fallback=true `latest` is pointed at that one instead, with one
    line saying so;
  * `latest` is missing (deleted, or a copy that left it out): the newest checkpoint its manifest
    verifies, with one line; none verifies: the caller decides (kiln.trainer.run_dir);
  * no manifest: a checkpoint of a kiln from before manifests loads with a one-line warning, unless
    another checkpoint of the run has one (this kiln wrote the run: a manifest removed is refused).
The ranks check the manifest again right before DeepSpeed opens the files (checkpoint.load).
"""
from pathlib import Path

from kiln.infer.checkpoint_manifest import ManifestError, has_manifest, verify_manifest
from kiln.trainer.checkpoint import CheckpointError, ckpt_root, latest_tag, set_latest


def _tags(run_dir: Path) -> list:
    return sorted(d.name for d in ckpt_root(run_dir).glob("step_*") if d.is_dir() and d.name[5:].isdigit())


def _verifies(tag_dir: Path) -> bool:
    try:
        return verify_manifest(tag_dir)
    except ManifestError:
        return False


def newest_verified(run_dir: Path, below: str | None = None) -> str | None:
    """The newest checkpoint (older than `below`, if given) whose files match its manifest."""
    for tag in reversed(_tags(run_dir)):
        if (below is None or tag < below) and _verifies(ckpt_root(run_dir) / tag):
            return tag
    return None


def resume_tag(run_dir: Path, fallback: bool, say=print) -> str | None:
    """The checkpoint to resume from, `latest` moved to it where needed (see the module doc); None
    when `latest` is missing and no checkpoint verifies. Raises CheckpointError, one line."""
    run_dir, root = Path(run_dir), ckpt_root(run_dir)
    tag = latest_tag(run_dir)
    if tag is None:
        good = newest_verified(run_dir)
        if good is not None:
            set_latest(run_dir, good)
            say(f"kiln: {root / 'latest'} was missing: resuming from {good}, the newest checkpoint whose "
                "manifest verifies")
        return good
    try:
        if verify_manifest(root / tag):
            return tag
        if any(has_manifest(root / t) for t in _tags(run_dir) if t != tag):
            raise ManifestError(f"{root / tag} has no manifest although the run's other checkpoints have",
                                root / tag)
    except ManifestError as e:
        good = newest_verified(run_dir, below=tag)
        if fallback and good is not None:
            set_latest(run_dir, good)
            say(f"kiln: checkpoint {tag} fails its manifest ({e}): resuming from {good}, the previous "
                "verified checkpoint (checkpoint.fallback=true)")
            return good
        back = (f"write {good} into {root / 'latest'} (or set checkpoint.fallback=true) to resume from the "
                "previous verified checkpoint, or " if good else "")
        raise CheckpointError(f"checkpoint {root / tag} cannot be loaded: {e}: {back}run with --no-resume "
                              "to start over (the old run is moved aside)") from None
    say(f"kiln: warning: checkpoint {tag} has no manifest (saved by an older kiln): its files are not "
        "verified before DeepSpeed reads them")
    return tag
