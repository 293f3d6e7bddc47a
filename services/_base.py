"""The one interface every backend adapter implements, and the helpers adapters share.

Adapters are plain synchronous Python (no Ray, no bus): they observe their backend and hand
typed events to an ``emit`` callable; the host (a BackendActor, or a test) stamps the envelope
(seq, incarnation, time) and publishes. Commands reach them through :meth:`BackendSession.call`.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from flowbus.schemas import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Event,
    UnknownOperation,
)

#: hands one event to the host; the host stamps seq/incarnation/time and publishes it
Emit = Callable[[Event], object]  # what it returns is ignored


@runtime_checkable
class BackendSession(Protocol):
    """A session with one backend instance (one server, one manager, one controller).

    Lifecycle: the constructor only stores configuration; :meth:`start` does the I/O.
    Errors: every method raises only :class:`~flowbus.schemas.BackendError` subclasses —
    ``BackendUnavailable``/``BackendTimeout`` (transient: the backend is down or slow),
    ``BackendRejected`` (our request was invalid), ``BackendProtocolError`` (garbage from the
    backend). :meth:`kill` never raises.

    Optional: ``release()`` (see :class:`Releasable`), which the host calls instead of
    :meth:`stop` when the broker fenced the session because a newer incarnation runs elsewhere.
    """

    name: str
    backend: str

    def start(self, emit: Emit, known: Mapping[str, Event], *, previous_address: str | None = None) -> None:
        """Connect (or start) the backend, publish ``Connected``, then compare the backend's
        state with ``known`` (the last states the bus journal holds for this source) and emit
        every difference with ``observed=resync``. ``previous_address`` is where the last
        incarnation's backend was (from its ``Connected`` event): a session that started its
        own server tries to adopt it first, so work that outlived a crash is not lost."""
        ...

    def poll(self) -> float:
        """Observe once (events, reconciliation, liveness, recovery); return the seconds until
        the host should call again. Called from a worker thread, never concurrently."""
        ...

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one backend operation by name; the result is plain data (dicts, lists, str)."""
        ...

    def operations(self) -> list[str]:
        """Names accepted by :meth:`call`."""
        ...

    def stop(self) -> None:
        """Graceful: finish the backend session and release every process it started."""
        ...

    def kill(self) -> None:
        """Best effort, immediate; logs failures and never raises."""
        ...


@runtime_checkable
class Releasable(Protocol):
    """A session that can be let go of (an optional part of :class:`BackendSession`)."""

    def release(self) -> None:
        """Let go of the backend without stopping it and without publishing anything: a newer
        incarnation elsewhere owns it now. Connections and threads of this process end; backend
        work (servers, managers, jobs, workflows) is left for the new incarnation to adopt.
        Idempotent; afterwards the session is closed and ``stop``/``kill`` do nothing more."""
        ...


@contextlib.contextmanager
def map_errors(mapping: Mapping[type[BaseException], type[BackendError]], operation: str) -> Iterator[None]:
    """Translate library exceptions into flowbus ones at the adapter edge (original chained)."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        for src, dst in mapping.items():
            if isinstance(exc, src):
                raise dst(f"{operation}: {exc}") from exc
        raise BackendProtocolError(f"{operation}: unexpected {type(exc).__name__}: {exc}") from exc


def dispatch(target: object, table: Mapping[str, str], operation: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``getattr(target, table[operation])``; unknown names raise :class:`UnknownOperation`."""
    method = table.get(operation)
    if method is None:
        known = ", ".join(sorted(table))
        raise UnknownOperation(f"unknown operation {operation!r}; known: {known}")
    func = getattr(target, method)
    try:
        inspect.signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise BackendRejected(f"{operation}: {exc}") from None
    return func(*args, **kwargs)


class Backoff:
    """Exponential backoff with a cap: ``next()`` gives the delay before the next attempt."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0
        self.not_before = 0.0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2.0**self.attempt)
        self.attempt += 1
        self.not_before = time.monotonic() + delay
        return delay

    def ready(self) -> bool:
        return time.monotonic() >= self.not_before

    def reset(self) -> None:
        self.attempt = 0
        self.not_before = 0.0


__all__ = [
    "BackendSession",
    "BackendTimeout",
    "BackendUnavailable",
    "Backoff",
    "Emit",
    "Releasable",
    "dispatch",
    "map_errors",
]
