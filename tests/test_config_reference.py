"""docs/configuration.md is generated from the config dataclasses and kept current; the flags' help texts stay short."""

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from segadapt.adapt.typed_config import field_docs, hints, unwrap

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "config_reference.py"
PAGE = ROOT / "docs" / "configuration.md"


def _load_script():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _load_script()


def _fields(cls, prefix=""):
    """(config class, field name, flag) of every leaf field, nested sections included."""
    hs = hints(cls)
    for f in dataclasses.fields(cls):
        base = unwrap(hs[f.name])[0]
        if dataclasses.is_dataclass(base):
            yield from _fields(base, prefix + f.name + ".")
        else:
            yield cls, f.name, "--" + (prefix + f.name).replace("_", "-")


ALL = [(command, cls, name, flag) for command, top in ref.COMMANDS for cls, name, flag in _fields(top)]


def test_committed_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == ref.render(), (
        "docs/configuration.md is out of date: run python scripts/config_reference.py")


def test_render_is_deterministic():
    assert ref.render() == ref.render()


def test_every_field_is_in_the_page():
    text = ref.render()
    sections = re.split(r"^## ", text, flags=re.M)
    by_command = {s.split("\n", 1)[0].strip(): s for s in sections[1:]}
    assert set(by_command) == {c for c, _ in ref.COMMANDS}
    missing = [f"{command} {flag}" for command, _, _, flag in ALL if f"| `{flag}` |" not in by_command[command]]
    assert not missing


def test_every_field_has_help():
    assert not [f"{cls.__name__}.{name}" for _, cls, name, _ in ALL if not field_docs(cls).get(name)]


BANNED = [re.compile(p, re.I) for p in (r"\bsessions? \d", r"issue #?\d", r"#\d", r"methods\.md",
                                        r"\[RECON", r"\[CODE", r"/work/", r"\.\./shared")]


@pytest.mark.parametrize("command,cls,name,flag", ALL, ids=[f"{a[0]}{a[3]}" for a in ALL])
def test_help_text_is_short_and_clean(command, cls, name, flag):
    doc = field_docs(cls).get(name, "")
    assert len(doc) <= 400, f"{flag}: help text of {len(doc)} characters (at most 400)"
    hits = [p.pattern for p in BANNED if p.search(doc)]
    assert not hits, f"{flag}: help text matches {hits}"


def test_class_docstrings_are_clean():
    classes = {cls for _, cls, _, _ in ALL} | {top for _, top in ref.COMMANDS}
    bad = {c.__name__: [p.pattern for p in BANNED if p.search(c.__doc__ or "")] for c in classes}
    assert not {k: v for k, v in bad.items() if v}


def test_cells_escape_pipes():
    assert ref._markdown("a | b", cell=True) == "a \\| b"
    assert ref._markdown("``x_y`` and <out>/a_b") == "`x_y` and &lt;out>/a\\_b"


def test_check_flag(tmp_path):
    out = tmp_path / "configuration.md"
    assert ref.main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == ref.render()
    assert ref.main(["--check", "--out", str(out)]) == 0
    out.write_text("stale\n", encoding="utf-8")
    assert ref.main(["--check", "--out", str(out)]) == 1
    assert ref.main(["--check", "--out", str(tmp_path / "absent.md")]) == 1


def test_script_imports_no_torch():
    code = (f"import runpy, sys; runpy.run_path({str(SCRIPT)!r}, run_name='not_main'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'transformers')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
