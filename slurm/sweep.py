"""`--sweep key=v1,v2 [--sweep ...]`: the grid of recipe overrides an array job runs, one point
per array task."""
import itertools
import re

from kiln.slurm.env import SlurmError


def parse_sweeps(specs: list[str]) -> list[tuple[str, list[str]]]:
    """["optim.lr=1e-3,3e-4"] -> [("optim.lr", ["1e-3", "3e-4"])]; SlurmError on a malformed one."""
    out = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        items = [v.strip() for v in values.split(",")]
        if not eq or not key.strip() or not all(items):
            raise SlurmError(f"--sweep {spec!r} must look like section.key=v1,v2 (e.g. --sweep optim.lr=1e-3,3e-4)")
        if any(key.strip() == k for k, _ in out):
            raise SlurmError(f"--sweep names {key.strip()} twice: give all its values in one --sweep")
        out.append((key.strip(), [_number(v) for v in items]))
    return out


def _number(text: str) -> str:
    """"1e-3" as "0.001": YAML 1.1 (the recipe's --set parser) reads a mantissa without a dot as
    a string, while a sweep of learning rates is written that way."""
    try:
        return repr(float(text)) if re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", text) else text
    except ValueError:
        return text


def grid(sweeps: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every point of the grid as --set overrides, the last sweep varying fastest."""
    keys = [k for k, _ in sweeps]
    return [[f"{k}={v}" for k, v in zip(keys, point)] for point in itertools.product(*(v for _, v in sweeps))]


def point_name(index: int, overrides: list[str]) -> str:
    """A run name for a grid point: its index and values ("03-lr3e-4-seed2"), safe as a folder."""
    parts = [f"{o.split('=', 1)[0].split('.')[-1]}{o.split('=', 1)[1]}" for o in overrides]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join([f"{index:02d}", *parts]))[:120]
