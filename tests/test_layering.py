"""The folders are the architecture: who may import whom (../shared/DESIGN.md, "Layers").

Every `import kiln.X` / `from kiln.X ...` in a folder's files, at any depth (function-level
imports too), must name a folder that layer may use. Without this test the layering decays.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    "kernels": set(),
    "data": set(),
    "model": {"kernels"},
    "growth": {"model", "kernels"},
    "parallel": {"model", "kernels"},
    "infer": {"model", "parallel", "kernels", "data"},
    "slurm": set(),
    "trainer": {"kernels", "data", "model", "growth", "parallel", "infer", "slurm"},
}


def kiln_imports(path: Path):
    """(line, imported kiln folder) for every absolute or relative import of kiln in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside its own folder unless it climbs out
                if node.level > len(path.relative_to(ROOT).parts) - 1:
                    names = [f"kiln.{node.module or ''}"]
            elif node.module:
                names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                         if node.module == "kiln" else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "kiln" and len(parts) > 1 and parts[1] in ALLOWED:
                yield node.lineno, parts[1]


def test_every_folder_is_in_the_table():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert folders <= set(ALLOWED), f"add the new folder's row to ALLOWED: {folders - set(ALLOWED)}"


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folder_imports_only_what_its_layer_allows(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, target in kiln_imports(path):
            if target != folder and target not in ALLOWED[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports kiln.{target}")
    assert not bad, f"{folder}/ may import only {sorted(ALLOWED[folder]) or 'nothing of kiln'}:\n" + "\n".join(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The walk finds imports inside functions and `from kiln import x` forms."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from kiln import trainer\n    import kiln.parallel.expert\n    import torch\n")
    assert sorted(t for _, t in kiln_imports(f)) == ["parallel", "trainer"]
