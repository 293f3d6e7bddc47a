"""The ``emit`` callable the adapter tests hand to a session: it keeps every event and wakes
waiters, so tests wait on a condition instead of sleeping (shared by every backend's tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flowbus.schemas import AttributeChanged, Event, LogLine, StateChanged

T = TypeVar("T")


def show(e: Event) -> str:
    """One short line per event, for assertion messages."""
    extra = ""
    if isinstance(e, StateChanged):
        extra = f" {e.state.value}/{e.native} try={e.try_no} {e.detail}".rstrip()
    elif isinstance(e, AttributeChanged):
        extra = f" {e.kind}:{e.name}={e.value!r}"
    elif isinstance(e, LogLine):
        extra = f" [{e.level}] {e.message[:60]}"
    return f"{type(e).__name__}[{e.observed.value}] {e.key}{extra}"


class Recorder:
    """Every event a session emitted, in order, with its arrival time."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.times: list[float] = []
        self.cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.times.append(time.monotonic())
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Event]], T | None], timeout: float = 10.0, what: str = "") -> T:
        """Wait until ``predicate(events)`` is truthy and return it; fail naming what was awaited."""
        with self.cond:
            result = self.cond.wait_for(lambda: predicate(self.events), timeout)
            if not result:
                seen = [show(e) for e in self.events[-30:]]
                raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}; last: {seen}")
            return result

    def of(self, cls: type[Any], key: str | None = None) -> list[Any]:
        with self.cond:
            return [e for e in self.events if isinstance(e, cls) and (key is None or e.key == key)]

    def states(self, key: str) -> list[StateChanged]:
        """The StateChanged events of one key, in order."""
        return self.of(StateChanged, key)

    def final(self, key: str, timeout: float = 10.0) -> StateChanged:
        """Wait for a final state of ``key``."""
        return self.wait_for(lambda ev: next((e for e in ev if isinstance(e, StateChanged) and e.key == key
                                              and e.state.final), None), timeout, f"a final state of {key}")

    def index(self, event: Event) -> int:
        with self.cond:
            return next(i for i, e in enumerate(self.events) if e is event)
