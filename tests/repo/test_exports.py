"""The public surface: thin package roots with sorted ``__all__``, each name exported once.

``flowbus.actors`` loads its names lazily; resolving them here imports Ray (that importing the
package alone does not is checked in tests/repo/test_layout.py).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGES = ("flowbus", "flowbus.schemas", "flowbus.bus", "flowbus.services", "flowbus.actors", "flowbus.actors.rules",
            "flowbus.demo", "flowbus.dashboard")

#: the convenience re-exports of the top-level package: (name, package that owns it)
ALLOWED_DUPLICATES = {
    ("Client", "flowbus.bus"),
    ("Match", "flowbus.bus"),
    ("default_address", "flowbus.bus"),
    ("Event", "flowbus.schemas"),
    ("State", "flowbus.schemas"),
    ("WaitTimeout", "flowbus.schemas"),
}


def sort_key(name: str) -> tuple[int, str]:
    """isort-style order (ruff RUF022): CONSTANTS, then Classes, then everything else."""
    if len(name) > 1 and name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def package(name: str) -> types.ModuleType:
    return importlib.import_module(name)


class TestExports:
    @pytest.mark.parametrize("name", PACKAGES)
    def test_all_is_sorted_and_unique(self, name: str) -> None:
        """Each package's ``__all__`` is sorted isort-style and names nothing twice."""
        exported = list(package(name).__all__)
        assert exported == sorted(exported, key=sort_key)
        assert len(set(exported)) == len(exported)

    @pytest.mark.parametrize("name", PACKAGES)
    def test_all_is_importable(self, name: str) -> None:
        """Every name in ``__all__`` can be imported from the package."""
        mod = package(name)
        missing = [n for n in mod.__all__ if not hasattr(mod, n)]
        assert missing == []
        namespace: dict[str, object] = {}
        exec(f"from {name} import *", namespace)  # noqa: S102 - the star import is what is tested
        assert set(mod.__all__) <= set(namespace)

    @pytest.mark.parametrize("name", PACKAGES)
    def test_public_objects_are_in_all(self, name: str) -> None:
        """Every public flowbus object a package root holds is listed in its ``__all__``."""
        mod = package(name)
        stray = [
            attr for attr, obj in vars(mod).items()
            if not attr.startswith("_") and attr not in mod.__all__
            and not isinstance(obj, types.ModuleType)
            and str(getattr(obj, "__module__", "")).startswith("flowbus")
        ]
        assert stray == []

    def test_each_name_exported_once(self) -> None:
        """A public name comes from exactly one package, apart from the listed top-level re-exports."""
        owners: dict[str, list[str]] = defaultdict(list)
        for name in PACKAGES:
            for attr in package(name).__all__:
                owners[attr].append(name)
        duplicates = {(attr, pkg) for attr, pkgs in owners.items() if len(pkgs) > 1
                      for pkg in pkgs if pkg != "flowbus"}
        for attr, pkgs in owners.items():
            if len(pkgs) > 1:
                assert len(pkgs) == 2 and "flowbus" in pkgs, (attr, pkgs)
        assert duplicates == ALLOWED_DUPLICATES

    def test_reexports_are_the_same_objects(self) -> None:
        """The top-level re-exports are the very objects their owning package exports."""
        import flowbus

        for attr, owner in ALLOWED_DUPLICATES:
            assert getattr(flowbus, attr) is getattr(package(owner), attr)

    def test_implementation_modules_are_private(self) -> None:
        """bus/, schemas/, actors/ and the subpackages actors/rules/ and flowbus/demo/ keep their
        implementation in ``_underscore`` modules (services/ has one public module per backend by
        design)."""
        root = Path(str(package("flowbus").__file__)).resolve().parent.parent
        for folder in ("bus", "schemas", "actors", "actors/rules", "flowbus/demo", "flowbus/dashboard"):
            public = [p.name for p in (root / folder).glob("*.py")
                      if not p.name.startswith("_") and p.name != "__init__.py"]
            assert public == [], folder


class TestInstalledLayout:
    @pytest.mark.timeout(60)
    def test_no_top_level_bus_or_schemas(self, tmp_path: Path) -> None:
        """Installing flowbus provides only ``flowbus``: no bare ``bus``/``schemas``/... modules."""
        code = (
            "import importlib.util as u, importlib.metadata as m\n"
            "print([n for n in ('bus', 'schemas', 'services', 'actors') if u.find_spec(n) is not None])\n"
            "print(u.find_spec('flowbus.bus') is not None, u.find_spec('flowbus.schemas') is not None)\n"
            "print((m.distribution('flowbus').read_text('top_level.txt') or '').split())\n"
        )
        # -I: ignore PYTHONPATH and the user site; cwd is an empty directory, not the repository
        proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, timeout=50, check=True)
        assert proc.stdout.splitlines() == ["[]", "True True", "['flowbus']"]

    def test_no_top_level_modules_in_this_process(self) -> None:
        """In the test process too, ``bus`` and ``schemas`` only resolve when the repo root is on sys.path."""
        import importlib.util

        root = str(Path(str(package("flowbus").__file__)).resolve().parent.parent)
        if any(str(Path(p or ".").resolve()) == root for p in sys.path):
            pytest.skip("the repository root is on sys.path (python -m pytest); checked in a subprocess")
        for name in ("bus", "schemas", "services", "actors"):
            assert importlib.util.find_spec(name) is None, name
