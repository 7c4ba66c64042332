"""Hostile-input fuzzing at length (issue #19, item 7): the classes of tests/fuzz/ with many more seeded
cases. Mutated recipes and overrides go through `kiln config` and the pre-launch memory check in this
process; hostile corpora through `kiln prepare`; damaged .bin/.idx files through `kiln train`, which must
refuse before starting ranks; a cache on a full tmpfs and on a read-only mount (root, `mount`).

Prints, per input class, the cases tried and their outcome classes (accepted / refused are allowed;
crash / noisy / hang are findings, each listed). The figures go into docs/reliability_inputs.md.

    python bench/fuzz.py [--seed 0] [--recipes 400] [--overrides 200] [--token-files 40]
"""
import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fuzz import mutations as M  # noqa: E402 - the generators live with the tests
from tests.fuzz.hostile import failures, report, run_case  # noqa: E402
from tests.fuzz.mounts import mounted_tmpfs, read_only_bind  # noqa: E402
from tests.fuzz.test_fuzz import _corpus_recipe, recipe_results  # noqa: E402


def corpus_results(tmp: Path) -> list:
    out = []
    for i, (name, kind, files) in enumerate(M.corpus_cases()):
        src = tmp / f"corpus{i}"
        src.mkdir()
        for fname, data in files.items():
            (src / fname).write_bytes(data)
        out.append(run_case(name, kind, ["prepare", _corpus_recipe(tmp, src, tmp / "cache")], 120))
    return out


def token_file_results(tmp: Path, rng: random.Random, n: int) -> list:
    src = tmp / "good"
    src.mkdir()
    for name, data in M.corpus_cases()[3][2].items():
        (src / name).write_bytes(data)
    recipe = _corpus_recipe(tmp, src, tmp / "tcache")
    first = run_case("prepare", "setup", ["prepare", recipe], 300)
    assert first.outcome == "accepted", first.describe()
    (folder,) = (tmp / "tcache").glob("data-*")
    pristine = tmp / "pristine"
    shutil.copytree(folder, pristine)
    targets = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".idx"))
    out = []
    for i in range(n):
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        target = folder / rng.choice(targets)
        how = M.flip_bits(rng, target, rng.choice([1, 2, 8, 64])) if rng.random() < 0.5 else M.truncate(rng, target)
        out.append(run_case(how, "token-files", ["train", recipe, "--set", f"train.name=damaged{i}"], 120))
    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    with mounted_tmpfs(tmp / "small", "48k") as small:
        out.append(run_case("cache on a full tmpfs", "storage/full-disk",
                            ["prepare", _corpus_recipe(tmp, src, small / "cache")], 120))
    with read_only_bind(tmp / "tcache", tmp / "ro") as ro:
        out.append(run_case("cache on a read-only mount", "storage/read-only",
                            ["prepare", _corpus_recipe(tmp, src, ro / "elsewhere")], 120))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", type=int, default=400, help="random recipe mutations (plus the fixed hostile files)")
    ap.add_argument("--overrides", type=int, default=200, help="random --set mutations (plus the fixed list)")
    ap.add_argument("--token-files", type=int, default=40, help="damaged .bin/.idx cases")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-fuzz-") as d:
        tmp = Path(d)
        (tmp / "r").mkdir()
        results = recipe_results(tmp / "r", rng, args.recipes, args.overrides)
        (tmp / "c").mkdir()
        results += corpus_results(tmp / "c")
        (tmp / "t").mkdir()
        results += token_file_results(tmp / "t", rng, args.token_files)
    print(f"kiln fuzz bench, seed {args.seed}: {len(results)} cases in {time.perf_counter() - t0:.0f} s")
    print(report(results))
    bad = failures(results)
    print(f"findings (crash / noisy / hang): {len(bad)}")
    for line in bad:
        print("  " + line)
    slowest = max(results, key=lambda r: r.seconds)
    print(f"slowest case: {slowest.seconds:.1f} s ({slowest.kind}: {slowest.name[:60]})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
