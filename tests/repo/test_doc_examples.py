"""Every code block of the README and docs/ is checked, so an example cannot rot: TOML parses as a
flowbus config, each `flowbus ...` line of a shell block is a command line the CLI accepts (and
each `bash scripts/dev.sh X` a command dev.sh has), Python compiles, YAML loads. Every Python
block also runs, as written, in the test that :data:`RUNS_PYTHON` names for its page (most need
a running stack: tests/cli/test_cli.py runs them against a real ``flowbus up``); the
orchestration TOML runs in tests/actors/test_rules.py, the helm values in tests/helm/test_helm.py."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from flowbus._cli import _parser
from flowbus.schemas import ConfigError, parse_config
from support.docs import BLOCK, ROOT, page_blocks

#: pages written elsewhere and copied in (notes, protocol facts): their blocks are not ours
FOREIGN = ("docs/notes/", "docs/protocols/", "docs/DESIGN.md")


def pages() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in found if not str(p.relative_to(ROOT)).startswith(FOREIGN)]


def blocks(lang: str) -> list[Any]:
    """``(where, text)`` params, one per ``lang`` block, named by file and line."""
    out = []
    for p in pages():
        text = p.read_text()
        for m in BLOCK.finditer(text):
            if m.group(1) == lang:
                where = f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
                out.append(pytest.param(where, m.group(2), id=where))
    return out


#: page -> the test module that runs its Python blocks as written (and names the page)
RUNS_PYTHON = {
    "README.md": "tests/cli/test_cli.py",
    "docs/python-api.md": "tests/cli/test_cli.py",
    "docs/orchestration.md": "tests/cli/test_cli.py",
    "docs/backends/guiserver.md": "tests/services/guiserver_tests/test_gs_docs.py",
    "docs/sessions.md": "tests/repo/test_doc_examples.py",
}


def dev_commands() -> set[str]:
    text = (ROOT / "scripts" / "dev.sh").read_text()
    return set(re.findall(r"^\s*([a-z]+)\)", text, re.MULTILINE))


@pytest.mark.parametrize(("where", "text"), blocks("toml"))
def test_toml_is_a_flowbus_config(where: str, text: str) -> None:
    data = tomllib.loads(text)
    if "sessions" in data or any(k in data for k in ("bus", "ray", "metrics", "log", "state-dir", "rules",
                                                     "policies")):
        try:
            parse_config(data, where)
        except ConfigError as exc:
            if "required" not in str(exc) and "missing" not in str(exc):  # a fragment may leave keys out
                raise


@pytest.mark.parametrize(("where", "text"), blocks("bash"))
def test_shell_lines_are_accepted(where: str, text: str) -> None:
    parser = _parser()
    commands = dev_commands()
    for line in text.splitlines():
        argv = shlex.split(line.replace(" &", ""), comments=True)
        if not argv:
            continue
        if argv[0].endswith("flowbus"):
            parser.parse_args(argv[1:])  # exit 2 on a form the CLI refuses
        elif argv[:2] == ["bash", "scripts/dev.sh"]:
            assert argv[2] in commands, f"{where}: dev.sh has no command {argv[2]!r} ({sorted(commands)})"


@pytest.mark.parametrize(("where", "text"), blocks("python"))
def test_python_compiles_and_runs_somewhere(where: str, text: str) -> None:
    compile(text, where, "exec")
    page = where.rsplit(":", 1)[0]
    runner = RUNS_PYTHON.get(page)
    assert runner, f"{where}: a Python example no test runs; run it as written and name its page in RUNS_PYTHON"
    assert page.rsplit("/", 1)[-1] in (ROOT / runner).read_text(), f"{runner} does not run the examples of {page}"


def test_the_sessions_page_example_runs() -> None:
    """docs/sessions.md: declaring an operation, as written."""
    for text in page_blocks("docs/sessions.md"):
        scope: dict[str, object] = {}
        exec(compile(text, "docs/sessions.md", "exec"), scope)  # noqa: S102 - our own documentation
        assert "suspend" in scope["OPS"].names()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("where", "text"), blocks("yaml"))
def test_yaml_loads(where: str, text: str) -> None:
    yaml = pytest.importorskip("yaml")
    yaml.safe_load(text)
