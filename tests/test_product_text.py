"""The product's text speaks to its users: no work log in README, docs, help texts, docstrings or comments.

A user reads what the software does and what it measured (with dates or versions), never which work session or
issue produced it, the developers' scratch run folders, or reference files that are not in the repository. The
measurement history lives in the git log and the dated changelog (docs/changelog.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a user reads: the README, the docs pages, the sources of the product and its benchmarks (docstrings, help
# texts and comments), the recipes and the CI script
TEXT = ["README.md", "mkdocs.yml", "pyproject.toml", ".ci/run", "benchmarks/README.md", "configs/README.md"]
FOLDERS = {"docs": "*.md", "adapt": "*.py", "export": "*.py", "runtime": "*.py", "demo": "*.py", "segadapt": "*.py",
           "benchmarks": "*.py", "configs": "*.json"}
WORK_LOG = {
    "a work session": re.compile(r"\bsessions? \d", re.I),
    "an issue number": re.compile(r"\bissues? #?\d|(?<![\w&/#])#(\d{1,2}|\d{4,5})\b", re.I),  # not "#444" (a colour)
    "a scratch run folder": re.compile(r"/work/|\bruns/s\d+\b|\bquick_s\d_[a-z]\b"),
    "an external reference file": re.compile(r"shared/docs|methods\.md"),
    "a reference-file tag": re.compile(r"\[(RECON|CODE)\]"),
}


def product_files() -> list[Path]:
    files = [ROOT / t for t in TEXT if (ROOT / t).is_file()]
    for folder, pattern in FOLDERS.items():
        files += sorted(p for p in (ROOT / folder).rglob(pattern) if "__pycache__" not in p.parts)
    return files


def work_log_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, line) for each line of ``text`` that matches a work-log pattern."""
    return [(i, what, line.strip()) for i, line in enumerate(text.splitlines(), 1)
            for what, rx in WORK_LOG.items() if rx.search(line)]


def test_the_patterns_catch_a_work_log_and_pass_product_text():
    bad = ["as measured in session 12", "Session 3's model", "see issue #14", "(#13)", "runs/s11/quick_s0/source",
           "/work/runs/x", "../shared/docs/methods.md 2.1", "[RECON] our design"]
    good = ["measured on 2026-12-04 (segadapt 0.1.0)", "the colour #1f77b4", "border: 1px solid #444", "step #",
            "rank 1 of 3 sessions",
            "`--seed 0`", "docs/method-notes.md, RCCR", "a 2-core machine", "&#39;"]
    assert all(work_log_lines(b) for b in bad), [b for b in bad if not work_log_lines(b)]
    assert not [g for g in good if work_log_lines(g)]


def test_no_work_log_in_the_product():
    files = product_files()
    assert len(files) > 50 and any(f.name == "README.md" for f in files)
    hits = [f"{f.relative_to(ROOT)}:{i}: {what}: {line[:100]}" for f in files
            for i, what, line in work_log_lines(f.read_text(encoding="utf-8", errors="replace"))]
    if hits:
        pytest.fail(f"{len(hits)} lines read as a work log:\n" + "\n".join(hits[:60]))


def test_every_docs_page_the_product_names_exists():
    """``docs/<page>.md`` named in a docstring, help text or page must exist (pages are renamed or removed)."""
    pages = re.compile(r"\bdocs/([\w.-]+\.(?:md|png))")
    missing = [f"{f.relative_to(ROOT)}:{i}: docs/{m}" for f in product_files()
               for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
               for m in pages.findall(line) if not (ROOT / "docs" / m).is_file()]
    assert not missing, "names of docs pages that do not exist:\n" + "\n".join(missing[:40])
