"""Match expressions for waits and callbacks.

``<topic-glob> [field=value[|value...]] [field!=value] ...``, e.g.
``qcg/local/state/job-* state=complete|aborted`` or ``ecflow/*/state//prod/ingest state=complete``.
The glob is matched against the whole topic (``*`` crosses ``/``); the literal part before the first
wildcard is the prefix the broker filters on. Fields are event attributes (``state``, ``native``,
``key``, ``source``, ``level``, ``value``, ...), plus ``type`` (the tag) and ``final``.

An expression is checked when it is parsed, so a typo is refused at once instead of waiting for
an event that can never come: the backend and family segments of the glob (when literal), a
``[`` without its ``]``, field names against every event type's fields, and the values of
``state=``, ``final=`` and ``type=``; each error lists the known values and, for a near miss,
says which one was meant. :meth:`Match.check_sessions` checks the session segment against the
sessions a running config has.
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from flowbus.schemas import EVENT_TYPES, Backend, Event, MatchSyntaxError, State, tag_of

_COND = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(!=|=)(.*)$")
_WILD = re.compile(r"[*?\[]")


#: what an expression may name
BACKENDS = frozenset(b.value for b in Backend)
FAMILIES = frozenset(str(cls.FAMILY) for cls in EVENT_TYPES)
FIELDS = frozenset({"type", "final"} | {f.name for cls in EVENT_TYPES for f in msgspec.structs.fields(cls)})
TAGS = frozenset(str(cls.__struct_config__.tag) for cls in EVENT_TYPES)
STATES = frozenset(s.value for s in State)
_VALUES = {"state": STATES, "final": frozenset({"true", "false"}), "type": TAGS}


def _unknown(what: str, got: str, known: Iterable[str], expr: str) -> MatchSyntaxError:
    known = sorted(known)
    near = difflib.get_close_matches(got, known, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return MatchSyntaxError(f"unknown {what} {got!r} in {expr!r}{hint} (known: {', '.join(known)})")


def _literal(segment: str) -> bool:
    return not _WILD.search(segment)


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
        self._check_glob(glob)
        self.glob = glob
        m = _WILD.search(glob)
        self.prefix = glob[: m.start()] if m else glob
        self._exact = m is None
        self._conds: list[tuple[str, bool, frozenset[str]]] = []
        for c in conds:
            cm = _COND.match(c)
            if not cm or not cm.group(3):
                raise MatchSyntaxError(f"bad condition {c!r} in {self.text!r}: expected field=value or field!=value")
            field, values = cm.group(1), frozenset(cm.group(3).split("|"))
            if field not in FIELDS:
                raise _unknown("field", field, FIELDS, self.text)
            for value in sorted(values - _VALUES.get(field, values)):
                raise _unknown(f"{field} value", value, _VALUES[field], self.text)
            self._conds.append((field, cm.group(2) == "=", values))
        self._predicate = predicate

    def _check_glob(self, glob: str) -> None:
        depth = 0
        for ch in glob:
            if ch == "[":
                depth += 1
            elif ch == "]" and depth:
                depth -= 1
        if depth:
            raise MatchSyntaxError(f"'[' without its ']' in the topic glob of {self.text!r} "
                                   "(topics are backend/session/family/key; [...] is a set of characters)")
        segs = glob.split("/")
        if _literal(segs[0]) and segs[0] not in BACKENDS:
            raise _unknown("backend", segs[0], BACKENDS, self.text)
        if len(segs) > 2 and segs[2] and _literal(segs[2]) and segs[2] not in FAMILIES:
            raise _unknown("family", segs[2], FAMILIES, self.text)

    def check_names(self, names: Iterable[str]) -> None:
        """Check a literal session segment against the session names of a running config."""
        segs = self.glob.split("/")
        if len(segs) < 2 or not segs[1] or not _literal(segs[1]) or segs[0] == Backend.FLOWBUS.value:
            return
        known = sorted(names)
        if segs[1] not in known:
            raise _unknown("session", segs[1], known, self.text)

    def check_sessions(self, sessions: Mapping[str, str]) -> None:
        """Check the session segment against ``sessions`` (name -> backend) of a running config:
        a literal name must be one of the backend's, a pattern must match one of them."""
        segs = self.glob.split("/")
        backend = segs[0]
        if len(segs) < 2 or not segs[1] or not _literal(backend) or backend == Backend.FLOWBUS.value:
            return
        mine = sorted(s for s, b in sessions.items() if b == backend)
        source = segs[1]
        if _literal(source):
            if source not in mine:
                raise _unknown(f"{backend} session", source, mine, self.text)
        elif not any(fnmatch.fnmatchcase(s, source) for s in mine):
            raise MatchSyntaxError(f"no {backend} session matches {source!r} in {self.text!r} "
                                   f"(configured: {', '.join(mine) or 'none'})")

    @property
    def exact(self) -> bool:
        """The glob is a literal topic (the match is about one slot)."""
        return self._exact

    def topic_matches(self, topic: str) -> bool:
        return topic == self.glob if self._exact else fnmatch.fnmatchcase(topic, self.glob)

    def __call__(self, ev: Event) -> bool:
        if not self.topic_matches(ev.topic()):
            return False
        for field, positive, values in self._conds:
            if field == "type":
                got = tag_of(ev)
            elif field == "final":
                if tag_of(ev) == "forgotten":
                    return False  # neither final nor not: the resource is gone (docs/retention.md)
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
