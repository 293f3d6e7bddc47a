"""The coverage table of each backend page (docs/backends/<backend>.md) cannot drift from the code.

A page's ``## Coverage`` section holds one table, ``| seed API | flowbus operation | test | events |``:
one row per method of the backend's own client API. The operation cell is a backticked operation
name, or ``—`` when the method is not reachable (the test cell then says why). Checked here:

- every operation the session's ``call()`` runs has a row, and every backticked name in the
  operation column is an operation of that session;
- every reachable row names a test, ``tests/...py::[Class::]test_name``, that exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from flowbus.services import SessionBase
from flowbus.services.ecflow import EcflowSession
from flowbus.services.guiserver import GuiserverSession
from flowbus.services.qcg import QcgSession
from flowbus.services.soma import SomaSession
from flowbus.services.wms import WmsSession

ROOT = Path(__file__).resolve().parents[2]
PAGES = ROOT / "docs" / "backends"
SESSIONS: dict[str, type[SessionBase]] = {"ecflow": EcflowSession, "guiserver": GuiserverSession, "qcg": QcgSession, "soma": SomaSession,
            "wms": WmsSession}
NOT_REACHABLE = "—"
TEST_REF = re.compile(r"`?(tests/[\w/]+\.py)::([\w:]+)`?")


def coverage_rows(page: Path) -> list[list[str]]:
    """The cells of the table under ``## Coverage`` (header and rule left out)."""
    text = page.read_text(encoding="utf-8")
    section = re.search(r"^## Coverage\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert section is not None, f"{page}: no '## Coverage' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
    assert len(rows) > 2, f"{page}: the Coverage section has no table"
    header = [c.strip().lower() for c in rows[0].strip("|").split("|")]
    assert header == ["seed api", "flowbus operation", "test", "events"], f"{page}: table header {header}"
    return [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows[2:]]


def defined(path: Path, dotted: str) -> bool:
    """Whether ``Class::test`` (or ``test``) is defined in the test file ``path``."""
    scope: list[ast.stmt] = ast.parse(path.read_text(encoding="utf-8")).body
    *classes, name = dotted.split("::")
    for cls in classes:
        found = [n for n in scope if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            return False
        scope = found[0].body
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in scope)


def pages() -> list[str]:
    return sorted(p.stem for p in PAGES.glob("*.md") if p.stem in SESSIONS) if PAGES.is_dir() else []


@pytest.mark.parametrize("backend", pages())
def test_the_coverage_table_matches_the_code(backend: str) -> None:
    rows = coverage_rows(PAGES / f"{backend}.md")
    known = set(SESSIONS[backend].ops.names())
    listed: set[str] = set()
    problems: list[str] = []
    for cells in rows:
        if len(cells) != 4:
            problems.append(f"row {cells}: 4 cells expected")
            continue
        seed, op, test, _events = cells
        if op == NOT_REACHABLE:
            if not test:
                problems.append(f"{seed}: not reachable, and the test cell does not say why")
            continue
        names = re.findall(r"`([^`]+)`", op)
        if not names:
            problems.append(f"{seed}: operation cell {op!r} names no `operation`")
        for name in names:
            if name not in known:
                problems.append(f"{seed}: `{name}` is not an operation of {backend} (known: {sorted(known)})")
            listed.add(name)
        refs = TEST_REF.findall(test)
        if not refs:
            problems.append(f"{seed}: no test named (tests/...py::name)")
        for path, dotted in refs:
            if not (ROOT / path).is_file() or not defined(ROOT / path, dotted):
                problems.append(f"{seed}: test {path}::{dotted} does not exist")
    missing = sorted(known - listed)
    if missing:
        problems.append(f"operations with no row: {missing}")
    assert not problems, f"docs/backends/{backend}.md:\n  " + "\n  ".join(problems)


def test_the_parser_reads_a_table(tmp_path: Path) -> None:
    """The checks above can fail: a table naming an unknown operation and a missing test is caught."""
    page = tmp_path / "x.md"
    page.write_text("# x\n\n## Coverage\n\n| seed API | flowbus operation | test | events |\n|---|---|---|---|\n"
                    "| `Client.a` | `a` | `tests/services/test_coverage_tables.py::test_nothing` | — |\n"
                    "| `Client.b` | — | jobs only (child commands) | — |\n")
    rows = coverage_rows(page)
    assert rows[0][:2] == ["`Client.a`", "`a`"] and rows[1][1] == NOT_REACHABLE
    assert TEST_REF.findall(rows[0][2]) == [("tests/services/test_coverage_tables.py", "test_nothing")]
    assert not defined(Path(__file__), "test_nothing")
    assert defined(Path(__file__), "test_the_parser_reads_a_table")
