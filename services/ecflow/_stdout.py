"""What ``ecflow.Client`` prints instead of returning it.

A few 5.9.2 client methods (``stats``, ``ch_suites``) write their reply with C++ ``std::cout``
on the process's file descriptor 1 and return ``None``. :func:`printed` runs such a call with
fd 1 pointed at a temporary file and returns the text written there.

fd 1 belongs to the whole process: one capture runs at a time (a process-wide lock), C and
Python buffers are flushed on both sides of the window, and anything another thread writes to
fd 1 during the window (a few milliseconds) lands in the captured text instead of the real
stdout. The session calls this with its own lock held, so its client is not used meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

#: one capture of fd 1 at a time in this process
_FD1_LOCK = threading.Lock()
_LIBC = ctypes.CDLL(None)


def _flush() -> None:
    stream = sys.stdout
    if stream is not None:
        stream.flush()
    _LIBC.fflush(None)  # every C stdio stream; std::cout writes through stdout's buffer


def printed(call: Callable[[], Any]) -> str:
    """Run ``call()`` with fd 1 captured; return what it printed (exceptions propagate, fd 1 restored)."""
    with _FD1_LOCK, tempfile.TemporaryFile() as buf:
        _flush()
        saved = os.dup(1)
        try:
            os.dup2(buf.fileno(), 1)
            try:
                call()
            finally:
                _flush()
                os.dup2(saved, 1)
        finally:
            os.close(saved)
        buf.seek(0)
        return buf.read().decode("utf-8", errors="replace")


def parse_handles(text: str) -> dict[int, tuple[str, list[str]]]:
    """``ch_suites`` text as ``{handle: (user, [suite, ...])}``: after the header
    ``User handle suites``, one line per handle (suites may be none); a user's later handles
    leave the user column out."""
    out: dict[int, tuple[str, list[str]]] = {}
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.split()[:3] == ["User", "handle", "suites"]), None)
    if start is None:
        return out
    user = ""
    for line in lines[start:]:
        parts = line.split()
        if parts and parts[0].isdigit():  # the user is printed on its first handle's line only
            out[int(parts[0])] = (user, parts[1:])
        elif len(parts) >= 2 and parts[1].isdigit():
            user = parts[0]
            out[int(parts[1])] = (user, parts[2:])
    return out


__all__ = ["parse_handles", "printed"]
