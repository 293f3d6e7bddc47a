"""Log rotation (``[log] file``, ``max-bytes``, ``backups``): the log never grows past its limit
and keeps at most ``backups`` rotated files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import structlog

from flowbus._logging import RotatingFile, configure

pytestmark = pytest.mark.timeout(30)


def test_rotates_at_max_bytes_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "flowbus.log"
    echo = io.StringIO()
    out = RotatingFile(path, max_bytes=2048, backups=2, echo=echo)
    line = "x" * 99 + "\n"
    for _ in range(100):  # 10,000 bytes: five files' worth
        out.write(line)
    out.flush()
    out.close()
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["flowbus.log", "flowbus.log.1", "flowbus.log.2"]
    assert all(p.stat().st_size <= 2048 for p in path.parent.iterdir())
    assert (path.stat().st_mode & 0o777) == 0o600
    assert echo.getvalue().count("\n") == 100, "every line also went to the echo"


def test_bad_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max-bytes must be >= 1024"):
        RotatingFile(tmp_path / "f.log", max_bytes=10)


def test_configure_writes_the_log_file(tmp_path: Path) -> None:
    path = tmp_path / "flowbus.log"
    configure("info", json=True, file=str(path), max_bytes=4096, backups=1)
    log = structlog.get_logger("flowbus.test")
    for i in range(200):
        log.info("retention.test.line", n=i)
    assert '"event": "retention.test.line"' in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flowbus.log", "flowbus.log.1"]
