"""Every code block of the README and docs/ is checked, so an example cannot rot: TOML parses as a
flowbus config, each `flowbus ...` line of a shell block is a command line the CLI accepts (and
each `bash scripts/dev.sh X` a command dev.sh has), Python compiles, YAML loads. Blocks that
need a running stack also run in the tests named beside them (the README's tour in
tests/cli/test_cli.py, the orchestration TOML in tests/actors/test_rules.py, the helm values in
tests/helm/test_helm.py)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from flowbus._cli import _parser
from flowbus.schemas import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]
#: pages written elsewhere and copied in (notes, protocol facts): their blocks are not ours
FOREIGN = ("docs/notes/", "docs/protocols/", "docs/DESIGN.md")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)


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
def test_python_compiles(where: str, text: str) -> None:
    compile(text, where, "exec")


@pytest.mark.parametrize(("where", "text"), blocks("yaml"))
def test_yaml_loads(where: str, text: str) -> None:
    yaml = pytest.importorskip("yaml")
    yaml.safe_load(text)
