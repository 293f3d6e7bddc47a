"""The distribution installs one import package, flowbus, with the four code folders inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class TestWheel:
    @pytest.mark.timeout(180)
    def test_wheel_holds_only_the_flowbus_package(self, tmp_path: Path) -> None:
        """`pip install .` would install flowbus/{schemas,bus,services,actors}, never a bare `bus`."""
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=170)
        wheel = next(tmp_path.glob("flowbus-*.whl"))
        names = zipfile.ZipFile(wheel).namelist()
        tops = {n.split("/", 1)[0] for n in names}
        assert {t for t in tops if not t.endswith(".dist-info")} == {"flowbus"}
        for sub in ("schemas", "bus", "services", "actors"):
            assert f"flowbus/{sub}/__init__.py" in names
        assert "flowbus/py.typed" in names and "flowbus/schemas/README.md" in names

    def test_editable_install_maps_the_folders(self) -> None:
        """In this (editable) environment the subpackages come from the top-level folders."""
        import importlib.util

        import flowbus.bus
        import flowbus.schemas

        assert Path(flowbus.bus.__file__).parent == ROOT / "bus"
        assert Path(flowbus.schemas.__file__).parent == ROOT / "schemas"
        assert importlib.util.find_spec("bus") is None and importlib.util.find_spec("schemas") is None
