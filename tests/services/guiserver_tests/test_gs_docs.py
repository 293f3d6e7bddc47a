"""The code examples of docs/backends/guiserver.md run as written."""

from __future__ import annotations

import contextlib
import io
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from flowbus.schemas import GuiserverSessionConfig
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.guiserver import emulator_fixture  # noqa: F401 - provides the `emulator` fixture

PAGE = Path(__file__).resolve().parents[3] / "docs" / "backends" / "guiserver.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)


@pytest.mark.timeout(60)
class TestPageExamples:
    def test_python_example(self, emulator: Callable[..., GuiserverEmulator]) -> None:
        """The Use example lists the directory and runs the job to its end against the emulator."""
        emu = emulator()
        emu.real("/data/exp/job_1.input").write_text("# fake\n")
        [code] = _blocks("python")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(PAGE), "exec"), {"port": emu.port})  # noqa: S102 - the page's own example
        printed = [ln for ln in out.getvalue().splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", ln)]  # not logs
        assert printed == ["['job_1.input']", "complete ENDED_GRACEFULLY"]

    def test_toml_example(self) -> None:
        """The configuration block decodes into a GuiserverSessionConfig."""
        [block] = _blocks("toml")
        [raw] = tomllib.loads(block)["sessions"]
        raw.pop("backend")
        cfg = msgspec.convert(raw, GuiserverSessionConfig)
        assert cfg.name == "difx" and cfg.allowed_dirs == ["/data"]
