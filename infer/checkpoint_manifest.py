"""A checkpoint's manifest: every file of a checkpoint folder with its size and sha256.

kiln writes `kiln_manifest.json` into a checkpoint folder after every rank's files are on disk
and before `latest` names the folder (kiln.trainer.checkpoint); every reader checks it before it
opens a file that needs full pickle (DeepSpeed's model and optimizer states), so that a file
changed, truncated or dropped in after the save is refused before any byte of it is unpickled.
It lives here, below the trainer, because kiln.infer.load reads checkpoints outside training and
must check them too (the layers: infer may not import trainer).

What it does not protect against: someone who can rewrite both a file and the manifest (the
manifest is not signed); see docs/reliability.md.
"""
import json
import os
from pathlib import Path

from kiln.data.manifest import fsync_dir, sha256_file
from kiln.infer.errors import InferError

MANIFEST = "kiln_manifest.json"
FORMAT = "kiln-checkpoint-manifest-v1"


class ManifestError(InferError):
    """A checkpoint whose files do not match its manifest; the message names the file."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


# Folders that tools write beside a checkpoint after its save, which no loader of the checkpoint
# opens: ExpertFlow's expert store (safetensors) and predictor (weights_only, its own manifest).
DERIVED = ("expertflow",)


def _files(tag_dir: Path) -> list:
    """The checkpoint's files (relative names, sorted), the manifest and DERIVED folders left out."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")
                  and p.relative_to(tag_dir).parts[0] not in DERIVED)


def write_manifest(tag_dir) -> dict:
    """Hash every file of `tag_dir` and publish the manifest atomically (written under a temporary
    name, flushed, renamed): a kill leaves either no manifest or a whole one. Returns it."""
    tag_dir = Path(tag_dir)
    doc = {"format": FORMAT, "tag": tag_dir.name,
           "files": {name: {"size": (tag_dir / name).stat().st_size, "sha256": sha256_file(tag_dir / name)}
                     for name in _files(tag_dir)}}
    tmp = tag_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(tag_dir / MANIFEST)
    fsync_dir(tag_dir)
    return doc


def has_manifest(tag_dir) -> bool:
    return (Path(tag_dir) / MANIFEST).is_file()


def verify_manifest(tag_dir) -> bool:
    """Check every file of `tag_dir` against its manifest: True when all are listed and match,
    False when the folder has no manifest (written by a kiln before manifests: unverified).
    Raises ManifestError naming the first file that is missing, of another size or checksum,
    or not listed (DeepSpeed finds some of its files by pattern, so an extra file could be read)."""
    tag_dir = Path(tag_dir)
    f = tag_dir / MANIFEST
    if not f.is_file():
        return False
    try:
        doc = json.loads(f.read_text())
        listed = doc["files"]
        if doc.get("format") != FORMAT or not isinstance(listed, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ManifestError(f"{f} is corrupt", f) from None
    for name, want in sorted(listed.items()):
        p = tag_dir / name
        if not p.is_file():
            raise ManifestError(f"{p} is missing (listed in its manifest)", p)
        size = p.stat().st_size
        if size != want.get("size"):
            raise ManifestError(f"{p} has {size} bytes, its manifest says {want.get('size')}", p)
        if sha256_file(p) != want.get("sha256"):
            raise ManifestError(f"{p} fails its manifest's sha256 (changed after the save)", p)
    extra = [n for n in _files(tag_dir) if n not in listed]
    if extra:
        raise ManifestError(f"{tag_dir / extra[0]} is not listed in the checkpoint's manifest "
                            "(added after the save)", tag_dir / extra[0])
    return True
