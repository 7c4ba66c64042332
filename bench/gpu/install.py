"""The wheelhouse install on the GPU machine, which reaches no package registry.

Every wheel whose distribution the machine lacks goes into one folder with
`pip install --no-index --no-deps --target`; nothing installed there is replaced (its torch
least of all), and that folder goes first on sys.path and PYTHONPATH (for the ranks too). kiln
itself is the repository: a `kiln` link to it in the same folder makes `import kiln` work
without building anything.
"""
import importlib
import importlib.util
import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# module to import -> distribution, for what kiln needs to train and what is nice to have
REQUIRED = {"deepspeed": "deepspeed", "omegaconf": "omegaconf",
            "megatron.core.datasets.indexed_dataset": "megatron-core"}
OPTIONAL = {"highspy": "highspy", "datasets": "datasets", "wandb": "wandb", "liger_kernel": "liger-kernel"}


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


def install(wheelhouse: Path, target: Path, dry: bool) -> dict:
    """Install what the machine lacks; {'installed': [...], 'kept': [...], 'imports': {...}}."""
    wheels = sorted(wheelhouse.glob("*.whl")) if wheelhouse.is_dir() else []
    res = {"wheelhouse": str(wheelhouse), "wheels": len(wheels),
           "mib": round(sum(w.stat().st_size for w in wheels) / 2 ** 20, 1), "installed": [], "kept": []}
    todo = [w for w in wheels if not _installed(_dist_name(w))]
    res["kept"] = sorted(_dist_name(w) for w in wheels if w not in todo)
    if not wheels:
        res["note"] = f"no wheelhouse at {wheelhouse} (`make wheelhouse` builds it)"
    if dry:
        res["would_install"] = [w.name for w in todo]
        res["note"] = res.get("note", "") + " dry run: nothing installed (this interpreter is not the GPU image's)"
    elif todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, todo)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        res["pip_rc"] = done.returncode
        if done.returncode:
            res["pip_error"] = (done.stdout + done.stderr)[-1500:]
        else:
            res["installed"] = [w.name for w in todo]
    target.mkdir(parents=True, exist_ok=True)
    _add_path(target)
    if importlib.util.find_spec("kiln") is None:
        link = target / "kiln"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        importlib.invalidate_caches()
        res["kiln"] = f"linked {link} -> {ROOT}"
    # the dry run only asks whether each distribution is installed (importing deepspeed and
    # megatron takes ~15 s on a small CPU); the GPU run imports every module
    res["imports"] = {mod: (_find(dist) if dry else _try_import(mod)) for mod, dist in {**REQUIRED, **OPTIONAL}.items()}
    res["ok"] = all(res["imports"][m] == "ok" for m in REQUIRED) and "pip_error" not in res
    if not dry and res["installed"]:
        res["pip_check"] = _pip_check(res["installed"])
    return res


def _add_path(target: Path) -> None:
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(target) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(target), *parts])
    importlib.invalidate_caches()


def _find(dist: str) -> str:
    return "ok" if _installed(dist) else f"PackageNotFoundError: {dist} is not installed"


def _try_import(mod: str) -> str:
    try:
        importlib.import_module(mod)
        return "ok"
    except Exception as e:  # noqa: BLE001 (report any import failure in one line)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _pip_check(installed: list) -> list:
    """pip check's lines about the packages just installed (a version the image has may be
    older than one of them asks for; pip installed them without resolving)."""
    names = {n.split("-")[0].replace("_", "-").lower() for n in installed}
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    return [ln for ln in done.stdout.splitlines() if ln.split(" ")[0].lower().replace("_", "-") in names]
