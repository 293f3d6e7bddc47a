"""The one place that configures structlog (the only process-global state flowbus sets)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

import structlog


class RotatingFile:
    """A log file that is rotated at ``max_bytes`` (``name.1`` ... ``name.<backups>``, the oldest
    dropped), written line by line; with ``echo``, every line also goes there (stderr)."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 64 * 1024 * 1024, backups: int = 5,
                 echo: TextIO | None = None) -> None:
        if max_bytes < 1024 or backups < 0:
            raise ValueError(f"log: max-bytes must be >= 1024 and backups >= 0 (got {max_bytes}, {backups})")
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backups, self.echo = max_bytes, backups, echo
        self._lock = threading.Lock()
        self._fh = self._open()
        self._size = self._fh.tell()

    def _open(self) -> TextIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8", errors="replace")

    def write(self, text: str) -> int:
        with self._lock:
            data = len(text.encode("utf-8", "replace"))
            if self._size and self._size + data > self.max_bytes:
                self._rotate()
            self._fh.write(text)
            self._size += data
        if self.echo is not None:
            self.echo.write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._fh.flush()
        if self.echo is not None:
            self.echo.flush()

    def _rotate(self) -> None:
        self._fh.close()
        name = self.path.name
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{name}.1"))
        self._fh = self._open()
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def configure(level: str = "info", json: bool = False, file: str = "", max_bytes: int = 64 * 1024 * 1024,
              backups: int = 5) -> None:
    """Log to stderr at ``level``; JSON lines for machines, coloured console for people. With
    ``file``, also to that file (plain text), rotated at ``max_bytes`` keeping ``backups``."""
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    out: TextIO | RotatingFile = sys.stderr
    if file:
        out = RotatingFile(file, max_bytes, backups, echo=sys.stderr)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=not file and sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]  # write/flush suffice
        cache_logger_on_first_use=False,
    )
