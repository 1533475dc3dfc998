"""Packaging: the wheel holds one import package, ``segadapt``, with every module of the repository's folders."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> its place in the wheel (pyproject.toml's [tool.setuptools.package-dir])
PACKAGE_DIRS = {"segadapt": "segadapt", "adapt": "segadapt/adapt", "export": "segadapt/export",
                "runtime": "segadapt/runtime", "demo": "segadapt/demo"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (no build/ or egg-info written into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    for d in PACKAGE_DIRS:
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list((tmp / "dist").glob("segadapt-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_only_the_segadapt_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"segadapt"}, sorted(top)
    assert all(n.startswith("segadapt/") for n in names if n.endswith(".py")), names
    for must in ("segadapt/cli.py", "segadapt/runtime/predictor.py", "segadapt/adapt/config.py",
                 "segadapt/export/onnx_export.py", "segadapt/demo/app.py", "segadapt/adapt/data/datasets.py"):
        assert must in names, must
    # every module of the repository's package folders is in the wheel (a sub-package missing from
    # [tool.setuptools] packages would silently be left out)
    missing = [f"{folder}/{p.relative_to(ROOT / folder).as_posix()}"
               for folder, target in PACKAGE_DIRS.items() for p in sorted((ROOT / folder).rglob("*.py"))
               if "__pycache__" not in p.parts
               and f"{target}/{p.relative_to(ROOT / folder).as_posix()}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    (di,) = dist_info
    assert "segadapt = segadapt.cli:main" in zipfile.ZipFile(wheel).read(f"{di}/entry_points.txt").decode()


def test_installed_wheel_imports_as_segadapt_only(wheel, tmp_path):
    """Installed (not editable), outside the checkout: ``segadapt.runtime`` imports, the repository's folder names
    do not (they exist only in the source tree)."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    code = """
import importlib, json, sys
res = {}
for name in ('runtime', 'adapt', 'export', 'demo'):
    try:
        importlib.import_module(name)
        res[name] = 'imported'
    except ImportError:
        res[name] = 'missing'
import segadapt.runtime.predictor, segadapt.runtime.video, segadapt.cli
res['predictor_from'] = segadapt.runtime.predictor.__file__
print(json.dumps(res))
"""
    # -I would drop PYTHONPATH; -s and a clean cwd keep the checkout and user site off sys.path. The editable
    # install's finder in the venv maps only segadapt.*, and PYTHONPATH comes first, so the wheel's copy wins.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-s", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: res[k] for k in ("runtime", "adapt", "export", "demo")} == dict.fromkeys(
        ("runtime", "adapt", "export", "demo"), "missing"), res
    assert Path(res["predictor_from"]).resolve() == (target / "segadapt" / "runtime" / "predictor.py").resolve()
