"""The package layout: no private import across packages, and the rules engine without Ray.

A package's ``_underscore`` modules (and ``_underscore`` names) are its own: code in another
package imports what the package root exports. The five code folders are separate packages
(``flowbus/`` and, mapped by pyproject's package-dir, ``schemas/``, ``bus/``, ``services/``,
``actors/``); a subpackage (``flowbus.demo``, ``flowbus.actors.rules``) is one too: its parent
imports its public names, while it may use its parent's private modules (it is part of them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: folder -> the package it is (pyproject's [tool.setuptools.package-dir])
FOLDERS = {"flowbus": "flowbus", "schemas": "flowbus.schemas", "bus": "flowbus.bus", "services": "flowbus.services",
           "actors": "flowbus.actors"}
TOPS = tuple(FOLDERS.values())


def module_of(path: Path) -> tuple[str, str]:
    """(dotted module, dotted package it belongs to) of a file of the shipped code."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = FOLDERS[folder].split(".") + rest
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def top_of(dotted: str) -> str:
    """Which of the five code folders a dotted name lies in (the longest prefix wins)."""
    return max((t for t in TOPS if dotted == t or dotted.startswith(t + ".")), key=len)


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def imported_names(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) for every import: each module imported, and each name taken from one
    (``from a.b import c`` gives ``a.b`` and ``a.b.c``); relative imports resolved in ``package``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{module}.{alias.name}"


def offence(dotted: str, package: str) -> str | None:
    """Why importing ``dotted`` from code in ``package`` reaches into another package's privates."""
    parts = dotted.split(".")
    if parts[0] != "flowbus":
        return None
    for i, part in enumerate(parts):
        if is_private(part):
            owner = ".".join(parts[:i])
            inside = package == owner or package.startswith(owner + ".")
            if inside and top_of(owner) == top_of(package):
                return None
            return f"{dotted} is private to {owner}"
    return None


def violations(folder: str) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        _, package = module_of(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, dotted in imported_names(tree, package):
            why = offence(dotted, package)
            if why:
                found.append(f"{path.relative_to(ROOT)}:{line}: {why}")
    return found


class TestChecker:
    """The checker itself, on small sources: it must catch what it is there to catch."""

    @pytest.mark.parametrize(("source", "package", "bad"), [
        ("from flowbus.bus._request import Requester", "flowbus.actors", True),
        ("import flowbus.bus._request", "flowbus", True),
        ("from flowbus.actors import _ray", "flowbus", True),
        ("from flowbus.demo._run import run_demo", "flowbus", True),  # a subpackage's private module
        ("from .rules._core import OrchestratorCore", "flowbus.actors", True),
        ("from flowbus._up import secure_bus", "flowbus.bus", True),  # bus/ is not inside flowbus/
        ("from flowbus.bus import Requester", "flowbus.actors", False),
        ("from . import _ray", "flowbus.actors", False),
        ("from ._engine import Engine", "flowbus.actors.rules", False),
        ("from flowbus._up import secure_bus", "flowbus.demo", False),  # its parent's private module
        ("from flowbus import __version__", "flowbus", False),
        ("import ray._private.utils", "flowbus.actors", False),
    ])
    def test_offence(self, source: str, package: str, bad: bool) -> None:
        found = [why for _, dotted in imported_names(ast.parse(source), package) if (why := offence(dotted, package))]
        assert bool(found) is bad, found

    def test_module_of(self) -> None:
        assert module_of(ROOT / "actors" / "rules" / "_core.py") == ("flowbus.actors.rules._core", "flowbus.actors.rules")
        assert module_of(ROOT / "actors" / "rules" / "__init__.py") == ("flowbus.actors.rules", "flowbus.actors.rules")
        assert module_of(ROOT / "flowbus" / "_cli.py") == ("flowbus._cli", "flowbus")


class TestNoPrivateImportAcrossPackages:
    @pytest.mark.parametrize("folder", ["flowbus", "schemas", "bus", "actors"])
    def test_shipped_code(self, folder: str) -> None:
        """Code in ``folder`` imports only public names of the other packages."""
        assert violations(folder) == []

    def test_services(self) -> None:
        """services/ imports only public names of the other packages."""
        assert violations("services") == []


class TestRulesWithoutRay:
    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("module", ["flowbus.rules", "flowbus.actors.rules", "flowbus.actors"])
    def test_import_does_not_load_ray(self, module: str) -> None:
        """``import flowbus.rules`` (and the engine it runs, and the lazy actors package) loads no Ray."""
        code = f"import sys, {module}; assert 'ray' not in sys.modules, sorted(m for m in sys.modules if 'ray' in m)"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50)
        assert proc.returncode == 0, proc.stderr[-2000:]

    @pytest.mark.timeout(60)
    def test_fences_before_ray(self) -> None:
        """Importing ``flowbus.actors`` sets the Ray fences, so a ``import ray`` after it is fenced; the
        first Ray-using name loads Ray."""
        code = ("import os, sys\nos.environ['RAY_AUTH_MODE'] = 'disabled'\nimport flowbus.actors as a\n"
                "assert os.environ['RAY_AUTH_MODE'] == 'token' and 'ray' not in sys.modules\n"
                "a.start_ray\nassert 'ray' in sys.modules\nprint('ok')")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50)
        assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
