"""Zombies as events: the server's zombie list (``zombie_get``) diffed against what was last
published.

A zombie is a job process whose child commands the server does not accept as the task's current
job (a wrong ECF_PASS, a second process, a task no longer active, ...). Each is published as
``AttributeChanged(key=<task path>, kind="zombie", name="<type>:<process id>")`` whose value is
what the server does with it, in ecFlow's words: ``auto-block`` (the child command waits) or
``auto-fob`` until someone acts, then ``manual-fail``, ``manual-block``, ``manual-kill``...
(``zombie_fob``, ``zombie_adopt`` and ``zombie_remove`` take it off the list). A zombie that
leaves the list is published with ``value=None``.

The session reads the list when a poll has news and at least once a second (a user action on a
zombie is not news to ``news_local``): a zombie that comes and goes within that second is not seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowbus.schemas import AttributeChanged, Event, Observed

ZKey = tuple[str, str]  # (task path, "<type>:<process id>")
KIND = "zombie"


def read(client: Any) -> dict[ZKey, str]:
    """The server's zombies now, keyed by task path and ``<type>:<process id>``."""
    out: dict[ZKey, str] = {}
    for zombie in client.zombie_get(0):
        name = f"{zombie.type_str()}:{zombie.process_or_remote_id() or '?'}"
        out[(str(zombie.path_to_task()), name)] = str(zombie.user_action_str())
    return out


class Zombies:
    """The zombies last published by one session."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.known: dict[ZKey, str] = {}

    def seed(self, known: Mapping[str, Event]) -> None:
        """Start from the bus journal's latest zombie events for this source."""
        for ev in known.values():
            if isinstance(ev, AttributeChanged) and ev.kind == KIND and isinstance(ev.value, str):
                self.known[(ev.key, ev.name)] = ev.value

    def diff(self, now: dict[ZKey, str], observed: Observed) -> list[Event]:
        """Record ``now``; return a zombie's appearance, change of action and disappearance."""
        out: list[Event] = []
        for (path, name), action in now.items():
            old = self.known.get((path, name))
            if old != action:
                out.append(self._event(path, name, action, old, observed))
        for (path, name), old in self.known.items():
            if (path, name) not in now:
                out.append(self._event(path, name, None, old, observed))
        self.known = dict(now)
        return out

    def _event(self, path: str, name: str, value: str | None, previous: str | None,
               observed: Observed) -> AttributeChanged:
        return AttributeChanged(source=self.source, backend="ecflow", key=path, observed=observed, kind=KIND,
                                name=name, value=value, previous=previous)


__all__ = ["KIND", "Zombies", "read"]
