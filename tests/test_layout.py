"""The package layout: one import package, and imports that run one way (read from the source, no import needed)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"adapt": "segadapt.adapt", "export": "segadapt.export", "runtime": "segadapt.runtime", "demo": "segadapt.demo",
         "segadapt": "segadapt"}


def _imports(folder: str):
    """(file, imported module) for every import statement under a top-level folder, function bodies included."""
    for f in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield f, node.module
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield f, a.name


# what each part may import of the others: export -> adapt and runtime; adapt -> runtime's three torch-free leaf
# modules (the label set, atomic file writes, Hub ids resolved to the local cache), nothing else; runtime and demo ->
# no torch, no adapt, no export
ALLOWED = {
    "adapt": ("segadapt.adapt", "segadapt.runtime.classes", "segadapt.runtime.files", "segadapt.runtime.hub"),
    "export": ("segadapt.export", "segadapt.adapt", "segadapt.runtime"),
    "runtime": ("segadapt.runtime",),
    "demo": ("segadapt.demo", "segadapt.runtime"),
}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_run_one_way(part):
    bad = []
    for f, mod in _imports(part):
        top = mod.split(".")[0]
        if top in ("adapt", "export", "runtime", "demo", "segadapt_cli"):
            bad.append(f"{f.relative_to(ROOT)}: top-level import {mod} (use segadapt.*)")
        elif top == "segadapt" and not mod.startswith(ALLOWED[part]):
            bad.append(f"{f.relative_to(ROOT)}: {mod}")
        elif part in ("runtime", "demo") and top in ("torch", "transformers", "safetensors"):
            bad.append(f"{f.relative_to(ROOT)}: {mod}")
    assert bad == []


def test_tests_and_benchmarks_use_the_namespace():
    old = ("adapt", "export", "runtime", "demo", "segadapt_cli")
    bad = [f"{f.relative_to(ROOT)}: {mod}" for folder in ("tests", "benchmarks", "segadapt")
           for f, mod in _imports(folder) if mod.split(".")[0] in old]
    assert bad == []


def test_pyproject_maps_every_part_under_segadapt():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {v: k for k, v in PARTS.items()}
    assert all(p.split(".")[0] == "segadapt" for p in cfg["packages"])
    # every package folder with an __init__.py is listed (a forgotten sub-package would be missing from the wheel)
    found = {PARTS[d.relative_to(ROOT).parts[0]] + "".join("." + x for x in d.relative_to(ROOT).parts[1:])
             for part in PARTS for d in [ROOT / part, *(ROOT / part).rglob("*")] if (d / "__init__.py").is_file()}
    assert found == set(cfg["packages"])
