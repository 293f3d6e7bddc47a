"""Retention of finished resources, written once for every session (see docs/retention.md).

A session remembers each resource whose latest published state is final (complete, aborted,
cancelled), oldest first. A resource is *due* once it is both older than ``retain-hours`` and
not among the newest ``retain-count`` finished ones (so whichever limit keeps more wins). The
session then forgets it (its adapter drops it from memory and, where configured, asks the
backend to forget it) and publishes ``Forgotten``, which makes the broker drop the key from the
snapshot and keep a tombstone.

A resource that leaves its final state (resubmitted, requeued) is no longer retained: it is
remembered again when it ends.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowbus.schemas import Event, State, StateChanged

#: forgotten per poll at most (a backlog is worked off over several polls, never in one long stall)
BATCH = 500


@dataclass(frozen=True)
class Retired:
    """A resource the session forgets: its key and what it ended as."""

    key: str
    state: State
    native: str


class Retention:
    """Finished resources in the order they finished, and which of them are due."""

    def __init__(self, hours: float = 24.0, count: int = 10_000) -> None:
        if hours < 0 or count < 0:
            raise ValueError(f"retain-hours and retain-count must be >= 0 (got {hours:g}, {count})")
        self.hours = hours
        self.count = count
        #: key -> (when it ended, seconds since the epoch; final state; native state)
        self._final: OrderedDict[str, tuple[float, State, str]] = OrderedDict()
        #: resources forgotten so far (for stats)
        self.forgotten = 0

    @classmethod
    def of(cls, config: Any) -> Retention:
        """From a session config (``retain-hours``, ``retain-count``; defaults when absent)."""
        return cls(float(getattr(config, "retain_hours", 24.0)), int(getattr(config, "retain_count", 10_000)))

    def __len__(self) -> int:
        return len(self._final)

    def seed(self, known: Mapping[str, Event]) -> None:
        """Finished resources the bus still holds for this source (a restarted session)."""
        events = [ev for ev in known.values() if isinstance(ev, StateChanged) and ev.key]
        for ev in sorted(events, key=lambda e: (e.time, e.seq)):
            self.note(ev, ev.time / 1e9 if ev.time else None)

    def note(self, ev: Event, when: float | None = None) -> None:
        """Follow one published event: a final state starts the clock, any other state stops it."""
        if not isinstance(ev, StateChanged) or not ev.key:
            return
        if ev.state.final:
            self._final[ev.key] = (time.time() if when is None else when, ev.state, ev.native)
            self._final.move_to_end(ev.key)
        else:
            self._final.pop(ev.key, None)

    def drop(self, keys: Iterable[str]) -> None:
        """Stop following these keys (the adapter forgot them by itself)."""
        for key in keys:
            self._final.pop(key, None)

    def due(self, now: float | None = None, limit: int = BATCH) -> list[Retired]:
        """Take (and stop following) the resources past both limits, oldest first."""
        now = time.time() if now is None else now
        horizon = now - self.hours * 3600.0
        out: list[Retired] = []
        while len(self._final) > self.count and len(out) < limit:
            key, (ended, state, native) = next(iter(self._final.items()))
            if ended > horizon:
                break
            del self._final[key]
            out.append(Retired(key, state, native))
        self.forgotten += len(out)
        return out

    def limits(self) -> dict[str, Any]:
        return {"retain_hours": self.hours, "retain_count": self.count, "retained": len(self._final),
                "forgotten": self.forgotten}


__all__ = ["BATCH", "Retention", "Retired"]
