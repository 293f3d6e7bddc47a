"""The one shape of a job's log, shared by every backend's ``logs`` operation.

``logs(key, max_bytes=65536)`` returns::

    {"key": key,
     "parts": [{"name": "stdout", "path": "/abs/file" | None, "text": "...", "truncated": False}, ...],
     "reason": "..."}          # present only when parts is empty: why there is no log

Each part's ``text`` is the last ``max_bytes`` bytes of that part, decoded as UTF-8 with
``errors="replace"`` (a multi-byte character cut at the start is dropped, not shown as U+FFFD);
``truncated`` says whether the start was cut. ``max_bytes`` outside 1..1048576 is refused with
``BackendRejected`` naming the operation.

:class:`TailRing` keeps the last bytes of text per key in memory (bounded in keys and in bytes per
key), for a backend whose job output reaches the session as messages rather than files.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from flowbus.schemas import BackendRejected

#: the default of ``max_bytes``
DEFAULT_MAX_BYTES = 65536
#: the largest ``max_bytes`` accepted (1 MiB)
LIMIT_MAX_BYTES = 1048576

Part = dict[str, Any]


def check_max_bytes(value: Any, operation: str = "logs") -> int:
    """``value`` as an int in 1..1048576, else ``BackendRejected`` naming ``operation``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMIT_MAX_BYTES:
        raise BackendRejected(f"{operation}: max_bytes must be an integer in 1..{LIMIT_MAX_BYTES}, got {value!r}")
    return value


def decode_tail(data: bytes, max_bytes: int, cut_before: bool = False) -> tuple[str, bool]:
    """The last ``max_bytes`` of ``data`` as text, and whether anything before it was cut
    (``cut_before``: ``data`` itself already starts after a cut)."""
    truncated = cut_before or len(data) > max_bytes
    if len(data) > max_bytes:
        data = data[len(data) - max_bytes:]
    if truncated:
        skip = 0
        while skip < min(3, len(data)) and 0x80 <= data[skip] <= 0xBF:  # continuation bytes of a cut character
            skip += 1
        data = data[skip:]
    return data.decode("utf-8", errors="replace"), truncated


def part(name: str, path: str | None, data: bytes, max_bytes: int, cut_before: bool = False) -> Part:
    """One part from bytes held in memory."""
    text, truncated = decode_tail(data, max_bytes, cut_before)
    return {"name": name, "path": path, "text": text, "truncated": truncated}


def file_part(name: str, path: str | os.PathLike[str], max_bytes: int) -> Part:
    """One part from the end of a file (read from its last ``max_bytes``, never the whole file).
    Raises ``OSError`` when the file cannot be read."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - max_bytes)
        f.seek(start)
        data = f.read(max_bytes)
    return part(name, os.fspath(path), data, max_bytes, cut_before=start > 0)


def file_parts(files: list[tuple[str, str]], max_bytes: int) -> tuple[list[Part], list[str]]:
    """The readable ones of ``(name, path)`` files as parts, and a note per file that is not."""
    parts: list[Part] = []
    missing: list[str] = []
    for name, path in files:
        try:
            parts.append(file_part(name, path, max_bytes))
        except FileNotFoundError:
            missing.append(f"{name} {path} does not exist (yet)")
        except OSError as exc:
            missing.append(f"{name} {path} cannot be read: {exc.strerror or exc}")
    return parts, missing


def result(key: str, parts: list[Part], reason: str = "") -> dict[str, Any]:
    """The ``logs`` answer; ``reason`` is kept only when there are no parts (and must say why)."""
    if parts:
        return {"key": key, "parts": parts}
    return {"key": key, "parts": [], "reason": reason or "no log is kept for this resource"}


class TailRing:
    """The last ``max_bytes`` of text per key for at most ``max_keys`` keys (the least recently
    written key goes first). Thread-safe: one writer (the poll thread), readers from calls."""

    def __init__(self, max_keys: int = 64, max_bytes: int = 256 * 1024) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, tuple[bytearray, bool]] = OrderedDict()
        self._lock = threading.Lock()

    def append(self, key: str, line: str) -> None:
        """Add one line (a newline is appended) to ``key``'s text."""
        raw = (line + "\n").encode("utf-8", errors="replace")
        with self._lock:
            buf, cut = self._data.pop(key, (bytearray(), False))
            buf += raw
            if len(buf) > self.max_bytes:
                del buf[:len(buf) - self.max_bytes]
                cut = True
            self._data[key] = (buf, cut)
            while len(self._data) > self.max_keys:
                self._data.popitem(last=False)

    def get(self, key: str) -> tuple[bytes, bool] | None:
        """``key``'s bytes and whether their start was dropped, or None when none are kept."""
        with self._lock:
            got = self._data.get(key)
            return None if got is None else (bytes(got[0]), got[1])

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._data)


__all__ = ["DEFAULT_MAX_BYTES", "LIMIT_MAX_BYTES", "Part", "TailRing", "check_max_bytes", "decode_tail",
           "file_part", "file_parts", "part", "result"]
