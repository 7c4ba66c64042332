"""Build the GPU check's wheelhouse: what the GPU image lacks, as wheels for its Python (`make wheelhouse`).

The packages kiln needs that the image lacks (deepspeed, megatron-core, omegaconf, highspy,
datasets, wandb) plus liger-kernel (a speed peer), and every requirement of theirs that the
image lacks too (image_packages.txt), one version each: the version installed here where there
is one (what kiln is tested with), else the newest that fits. Binary wheels for CPython 3.12 on
manylinux x86-64 where PyPI has them; an sdist-only package (deepspeed) is built here into a
pure wheel with `pip wheel --no-deps` (DS_BUILD_OPS=0: no ops compiled; kiln needs none). torch,
triton and CUDA packages are never fetched. The total must stay under the 64 MiB a device call
carries, with the repository beside it.

    .venv/bin/python bench/gpu/wheelhouse.py [--out wheelhouse]
"""
import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WANTED = ["deepspeed", "megatron-core", "omegaconf", "highspy", "datasets", "wandb", "liger-kernel"]
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pytorch-triton.*)$")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
LIMIT_MIB = 64
# the GPU machine's interpreter, for requirement markers
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set:
    lines = (HERE / "image_packages.txt").read_text().splitlines()
    return {canon(x) for x in lines if x.strip() and not x.startswith("#")}


def spec_for(req: Requirement) -> str:
    """The version installed here if it satisfies the requirement, else the requirement itself."""
    try:
        have = md.version(req.name)
        if req.specifier.contains(have, prereleases=True):
            return f"{req.name}=={have}"
    except md.PackageNotFoundError:
        pass
    return f"{req.name}{req.specifier}"


def fetch(spec: str, out: Path) -> Path:
    """One wheel for `spec` into out: a binary download, else a local pure build. Its path."""
    before = set(out.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), spec]
    if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
        print(f"  {spec}: no binary wheel for cp312 manylinux; building a pure wheel here", flush=True)
        env = dict(os.environ, DS_BUILD_OPS="0")
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                "-w", str(out), spec], capture_output=True, text=True, env=env)
        if built.returncode:
            raise SystemExit(f"wheelhouse: error: cannot get a wheel for {spec}: {built.stderr.strip()[-500:]}")
    new = set(out.glob("*.whl")) - before
    if not new:  # already there from an earlier build
        name = canon(Requirement(spec).name)
        return next(w for w in out.glob("*.whl") if canon(w.name.split("-")[0]) == name)
    return new.pop()


def requirements(wheel: Path) -> list:
    """The wheel's unconditional requirements on the GPU machine's Python (no extras)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    reqs = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            r = Requirement(line.split(":", 1)[1].strip())
            if r.marker is None or r.marker.evaluate({**TARGET_ENV, "extra": ""}):
                reqs.append(r)
    return reqs


def build(out: Path) -> list:
    """Fetch WANTED and the closure of their requirements that the image lacks."""
    out.mkdir(parents=True, exist_ok=True)
    have, done, wheels = image_packages(), set(), []
    queue = [Requirement(n) for n in WANTED]
    while queue:
        req = queue.pop(0)
        name = canon(req.name)
        if name in done or name in have or NEVER.match(name):
            continue
        done.add(name)
        wheel = fetch(spec_for(req), out)
        wheels.append(wheel)
        print(f"  {wheel.name} ({wheel.stat().st_size / 2 ** 20:.1f} MiB)", flush=True)
        queue += requirements(wheel)
    for stale in set(out.glob("*.whl")) - set(wheels):  # one version of each, nothing else
        stale.unlink()
    return wheels


def tree_mib() -> float:
    """Size of what a device call sends besides the wheelhouse: tracked and untracked-unignored files."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file()) / 2 ** 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "wheelhouse"))
    args = p.parse_args(argv)
    out = Path(args.out)
    print(f"wheelhouse: {out} (CPython 3.12, manylinux x86-64; leaving out what the GPU image has)", flush=True)
    wheels = build(out)
    total = sum(w.stat().st_size for w in wheels) / 2 ** 20
    tree = tree_mib()
    print(f"wheelhouse: {len(wheels)} wheels, {total:.1f} MiB; with the working tree ({tree:.1f} MiB) "
          f"{total + tree:.1f} MiB of the {LIMIT_MIB} MiB a device call carries")
    if total + tree >= LIMIT_MIB:
        print(f"wheelhouse: error: {total + tree:.1f} MiB will not travel (limit {LIMIT_MIB} MiB)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
