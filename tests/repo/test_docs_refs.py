"""Documents the code refers to are in the repository, under docs/.

A section reference (the section sign, then a number such as 5.1) names its document on the same
line, e.g. ``(docs/protocols/guiserver.md`` and the sign with ``8)``; the document exists and has
a heading with that number. Every ``docs/...md`` path named in code exists. This file writes the
sign as an escape, so that a search for it finds only real references.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIGN = "\N{SECTION SIGN}"
#: what counts as code here: the files we write by hand, outside docs/ and generated trees
SUFFIXES = {".py", ".sh", ".toml", ".yaml", ".yml", ".tpl", ".cfg", ".c"}
SKIP_DIRS = {".git", ".venv", ".lint", "docs", "build", "dist", "__pycache__", ".hypothesis", ".pytest_cache"}
DOC_PATH = re.compile(r"docs/[\w./-]+?\.md\b")
SECTION = re.compile(SIGN + r"(\d+(?:\.\d+)*[a-z]?)")


def code_files() -> list[Path]:
    """Every code file of the repository (what SUFFIXES names), docs/ and generated trees left out,
    and this file, whose examples are wrong on purpose."""
    out: list[Path] = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out.extend(Path(folder, f) for f in files if Path(f).suffix in SUFFIXES)
    return sorted(p for p in out if p != Path(__file__).resolve())


def line_problems(line: str, root: Path = ROOT) -> list[str]:
    """What is wrong with the references on one line ([] when nothing is)."""
    problems = []
    docs = [(m.start(), m.group()) for m in DOC_PATH.finditer(line)]
    for doc in {d for _, d in docs}:
        if not (root / doc).is_file():
            problems.append(f"{doc} is not in the repository")
    for m in SECTION.finditer(line):
        named = [d for at, d in docs if at < m.start()]
        if not named:
            problems.append(f"{m.group()} names no docs/ file before it on its line")
            continue
        path = root / named[-1]
        if path.is_file() and not has_heading(path.read_text(encoding="utf-8"), m.group(1)):
            problems.append(f"{named[-1]} has no heading {m.group(1)}")
    return problems


def has_heading(text: str, number: str) -> bool:
    """True when a Markdown heading of ``text`` starts with ``number`` (``5.1`` matches ``### 5.1 Job run``)."""
    return re.search(rf"^#+\s+{re.escape(number)}(?![\w])", text, re.MULTILINE) is not None


def all_problems() -> list[str]:
    out: list[str] = []
    for path in code_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if SIGN in line or "docs/" in line:
                out.extend(f"{path.relative_to(ROOT)}:{n}: {p}" for p in line_problems(line))
    return out


class TestDocsRefs:
    def test_code_references_resolve(self) -> None:
        """Every section reference in code names an existing docs/ file with that heading, and every docs/ path exists."""
        problems = all_problems()
        assert not problems, "\n".join(problems)

    def test_the_referenced_documents_are_there(self) -> None:
        """The documents the code refers to most are in docs/, and the code does refer to them."""
        referenced = {d for p in code_files() for d in DOC_PATH.findall(p.read_text(encoding="utf-8", errors="replace"))}
        assert {"docs/protocols/guiserver.md", "docs/notes/ray-deploy.md", "docs/DESIGN.md"} <= referenced
        assert all((ROOT / d).is_file() for d in referenced)


class TestTheChecker:
    @pytest.mark.parametrize(("line", "expected"), [
        (f"(docs/protocols/guiserver.md {SIGN}8)", []),
        (f"(spec: docs/protocols/guiserver.md {SIGN}2-{SIGN}3, {SIGN}5.1)", []),
        (f"see {SIGN}5.1", [f"{SIGN}5.1 names no docs/ file before it on its line"]),
        (f"{SIGN}5.1 of docs/protocols/guiserver.md", [f"{SIGN}5.1 names no docs/ file before it on its line"]),
        (f"(docs/protocols/nosuch.md {SIGN}1)", ["docs/protocols/nosuch.md is not in the repository"]),
        (f"(docs/protocols/guiserver.md {SIGN}42.7)", ["docs/protocols/guiserver.md has no heading 42.7"]),
        (f"docs/notes/ray-deploy.md {SIGN}1.11; docs/protocols/guiserver.md {SIGN}6.1a", []),
    ])
    def test_line_problems(self, line: str, expected: list[str]) -> None:
        """A bare reference, a missing document and a missing section are each reported; good ones are not."""
        assert line_problems(line) == expected

    def test_heading_numbers_match_whole(self) -> None:
        """Section 5.1 is not found in a heading 5.10, nor 6.1 in 6.1a."""
        assert not has_heading("### 5.10 Later\n### 6.1a Other\n", "5.1")
        assert not has_heading("### 6.1a Other\n", "6.1")
        assert has_heading("## 2. Transport\n", "2")
