"""Where ecFlow's errors become flowbus errors, and ecFlow's results plain data.

``ecflow.Client`` raises a plain ``RuntimeError`` for everything; the server's words tell a
connection failure (``BackendUnavailable``) from a refused request (``BackendRejected``).
Results are plain, picklable data: ``Defs`` and other ecFlow objects travel as their text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from flowbus.schemas import BackendError, BackendRejected, BackendTimeout, BackendUnavailable

from .._base import map_errors

_UNREACHABLE = ("failed to connect", "connection error", "connection refused", "is the server running",
                "end of file", "connection reset", "broken pipe", "ran out of end points", "host not found",
                "no route to host", "network is unreachable", "name or service not known")
_TIMED_OUT = ("timed out after",)


def classify(exc: BaseException, operation: str) -> BackendError:
    """The flowbus error for an ecFlow ``RuntimeError``, carrying the server's message."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if any(word in low for word in _TIMED_OUT):
        return BackendTimeout(f"{operation}: {text}")
    if any(word in low for word in _UNREACHABLE):
        return BackendUnavailable(f"{operation}: {text}")
    return BackendRejected(f"{operation}: {text}")


@contextlib.contextmanager
def ecflow_errors(operation: str) -> Iterator[None]:
    """``RuntimeError`` by its text (see :func:`classify`); wrong argument types (Boost's
    ``ArgumentError`` is a ``TypeError``) and bad values are ``BackendRejected``. Chained."""
    with map_errors({TypeError: BackendRejected, ValueError: BackendRejected, OSError: BackendUnavailable},
                    operation):
        try:
            yield
        except RuntimeError as exc:
            raise classify(exc, operation) from exc


def plain(value: Any) -> Any:
    """A picklable copy of an ecFlow result: Defs, nodes and enums as their text, containers recursed."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, int):  # a Boost.Python enum value (a subclass of int)
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if type(value).__name__.endswith(("Vec", "List")):  # ecFlow's vector wrappers
        return [plain(v) for v in value]
    return str(value)


def as_enum(kind: Any, value: Any, what: str) -> Any:
    if isinstance(value, kind):
        return value
    names = {n.lower(): v for n, v in kind.names.items()}
    got = names.get(str(value).lower())
    if got is None:
        raise BackendRejected(f"{what}: {value!r} is not one of {sorted(names)}")
    return got


def as_str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise BackendRejected(f"{what}: expects a non-empty str, got {value!r}")
    return value
