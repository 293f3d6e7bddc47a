"""Match expressions for waits and callbacks.

``<topic-glob> [field=value[|value...]] [field!=value] ...``, e.g.
``qcg/local/state/job-* state=complete|aborted`` or ``ecflow/*/state//prod/ingest state=complete``.
The glob is matched against the whole topic (``*`` crosses ``/``); the literal part before the first
wildcard is the prefix the broker filters on. Fields are event attributes (``state``, ``native``,
``key``, ``source``, ``level``, ``value``, ...), plus ``type`` (the tag) and ``final``.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Callable
from typing import Any

from flowbus.schemas import Event, MatchSyntaxError, State, tag_of

_COND = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(!=|=)(.*)$")
_WILD = re.compile(r"[*?\[]")


def _text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


class Match:
    """A parsed match expression; call it with an event."""

    def __init__(self, expr: str, predicate: Callable[[Event], bool] | None = None) -> None:
        self.text = expr.strip()
        parts = self.text.split()
        if not parts:
            raise MatchSyntaxError("empty match expression: give at least a topic glob such as 'qcg/*'")
        glob, conds = parts[0], parts[1:]
        if _COND.match(glob):
            glob, conds = "*", parts
        self.glob = glob
        m = _WILD.search(glob)
        self.prefix = glob[: m.start()] if m else glob
        self._exact = m is None
        self._conds: list[tuple[str, bool, frozenset[str]]] = []
        for c in conds:
            cm = _COND.match(c)
            if not cm or not cm.group(3):
                raise MatchSyntaxError(f"bad condition {c!r} in {self.text!r}: expected field=value or field!=value")
            self._conds.append((cm.group(1), cm.group(2) == "=", frozenset(cm.group(3).split("|"))))
        self._predicate = predicate

    def topic_matches(self, topic: str) -> bool:
        return topic == self.glob if self._exact else fnmatch.fnmatchcase(topic, self.glob)

    def __call__(self, ev: Event) -> bool:
        if not self.topic_matches(ev.topic()):
            return False
        for field, positive, values in self._conds:
            if field == "type":
                got = tag_of(ev)
            elif field == "final":
                state = getattr(ev, "state", None)
                got = _text(isinstance(state, State) and state.final)
            else:
                if not hasattr(ev, field):
                    return False
                got = _text(getattr(ev, field))
            if (got in values) != positive:
                return False
        return self._predicate is None or self._predicate(ev)

    def __repr__(self) -> str:
        return f"Match({self.text!r})"

    def __str__(self) -> str:
        return self.text


def as_match(match: str | Match) -> Match:
    return match if isinstance(match, Match) else Match(match)
