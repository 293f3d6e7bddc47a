"""The distribution installs one import package, flowbus, with the four code folders inside it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
        for sub in ("schemas", "bus", "services", "actors", "actors/rules", "demo"):
            assert f"flowbus/{sub}/__init__.py" in names
        assert "flowbus/py.typed" in names and "flowbus/schemas/README.md" in names

    @pytest.mark.timeout(60)
    def test_editable_install_maps_the_folders(self, tmp_path: Path) -> None:
        """Installed (editable here), flowbus.bus comes from ./bus and no bare `bus` exists.

        Run from another directory: `python -m pytest` puts the checkout itself on sys.path.
        """
        probe = ("import importlib.util, json, flowbus.bus, flowbus.schemas;"
                 "print(json.dumps([flowbus.bus.__file__, flowbus.schemas.__file__,"
                 " [importlib.util.find_spec(n) is None for n in ('bus', 'schemas', 'services', 'actors')]]))")
        out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                             check=True, timeout=50).stdout
        bus_file, schemas_file, absent = json.loads(out)
        assert Path(bus_file).parent == ROOT / "bus"
        assert Path(schemas_file).parent == ROOT / "schemas"
        assert absent == [True, True, True, True]
