"""What the dashboard shows, kept from the events of the bus: sans-I/O, no clock of its own.

:class:`DashboardModel` takes events (:meth:`~DashboardModel.apply`) and answers with *ops*, plain
JSON-ready dicts the browser applies to its copy (``row``, ``remove``, ``feed``, ``session``); a
browser that connects first gets :meth:`~DashboardModel.snapshot`. Filtering by a match
expression happens here too (:meth:`~DashboardModel.visible`), so the browser never has to
understand the expression language.

- A **row** is one resource (``backend/source/key``): its latest state, native state, failure
  reason, try number, progress, staleness (from :class:`~flowbus.schemas.Freshness`) and its
  timeline (state intervals of the last ``hours``). The browser builds the tree backend ->
  session -> path segments of the key (ecFlow ``/suite/family/task``, soma ``workflow/job``...).
- A **session** is one source: up or disconnected (with the reason), stale or not.
- The **feed** is what an operator wants to see scroll by: rule firings, recoveries and give-ups,
  errors, disconnections, error/warning log lines, lag.

Bounds: at most ``max_resources`` rows (the least recently changed go first), ``max_timeline``
intervals over all rows (the oldest go first) and ``max_feed`` feed items; nothing grows without
limit however long ``flowbus up`` runs.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from flowbus.schemas import (
    AttributeChanged,
    Connected,
    Disconnected,
    ErrorEvent,
    Event,
    Forgotten,
    Freshness,
    LogLine,
    PublisherLost,
    RecoveryAttempted,
    RecoveryGaveUp,
    RuleFired,
    StateChanged,
    SubscriberLagged,
)

Op = dict[str, Any]

#: ecFlowUI's default state colours (its ``ecflowview`` palette), plus one for flowbus' cancelled
STATE_COLOURS = {
    "unknown": "#bebebe",
    "queued": "#add9e7",
    "submitted": "#04e1d1",
    "active": "#00ff00",
    "complete": "#ffff00",
    "aborted": "#ff0000",
    "suspended": "#ffa600",
    "cancelled": "#c08bd8",
}


class _Row:
    __slots__ = ("attrs", "ev", "id", "path", "progress", "segments", "source_backend")

    def __init__(self, rid: str, ev: Event) -> None:
        self.id = rid
        self.ev: Event = ev  # the latest StateChanged, else the latest attribute event
        self.attrs: dict[str, AttributeChanged] = {}
        self.progress: float | None = None
        self.segments: list[list[Any]] = []  # [state, start ns]
        self.path = [ev.backend, ev.source, *[p for p in ev.key.split("/") if p]]
        if len(self.path) == 2:  # a key without a segment (empty or only slashes)
            self.path.append(ev.key or "(session)")


def row_id(ev: Event) -> str:
    return f"{ev.backend}/{ev.source}/{ev.key}"


def _reason(ev: Event) -> str:
    if isinstance(ev, StateChanged):
        if ev.detail:
            return ev.detail
        for k in ("reason", "error", "exit_code", "exit"):
            if ev.attrs.get(k) not in (None, ""):
                return f"{k} {ev.attrs[k]}" if k.startswith("exit") else str(ev.attrs[k])
    return ""


class DashboardModel:
    """The dashboard's state. ``now`` (ns since the epoch) is asked for pruning only."""

    def __init__(self, *, hours: float = 6.0, max_resources: int = 5000, max_timeline: int = 50000,
                 max_feed: int = 200, now: Callable[[], int] | None = None) -> None:
        import time

        self.window_ns = int(hours * 3600e9)
        self.max_resources, self.max_timeline = max_resources, max_timeline
        self._now = now or time.time_ns
        self._rows: OrderedDict[str, _Row] = OrderedDict()
        self._by_source: dict[str, set[str]] = {}
        self._segments: deque[tuple[str, int]] = deque()  # (row id, start) in arrival order
        self._feed: deque[tuple[Op, Event]] = deque(maxlen=max_feed)
        self._sessions: dict[str, Op] = {}
        self._fresh = Freshness()
        self.dropped_rows = 0

    # -- taking events in ------------------------------------------------------------------------

    def apply_many(self, events: Iterable[Event]) -> list[tuple[Op, Event | None]]:
        out: list[tuple[Op, Event | None]] = []
        for ev in events:
            out += self.apply(ev)
        return out

    def apply(self, ev: Event) -> list[tuple[Op, Event | None]]:
        """Take one event; the ops it causes, each with the event a filter is checked against
        (``None``: shown to every browser)."""
        out: list[tuple[Op, Event | None]] = []
        if self._fresh.apply(ev):  # a source went stale or fresh again: its rows and session change
            out += [(self._row_op(r), r.ev) for r in self._rows_of(ev.source)]
            if ev.source in self._sessions:
                out.append((self._session_op(ev.source), None))
        if isinstance(ev, (Connected, Disconnected)):
            self._sessions[ev.source] = {"backend": ev.backend, "source": ev.source,
                                         "up": isinstance(ev, Connected), "time": ev.time,
                                         "reason": ev.reason if isinstance(ev, Disconnected) else ""}
            out.append((self._session_op(ev.source), None))
        if isinstance(ev, (StateChanged, AttributeChanged)):
            out += self._resource(ev)
        elif isinstance(ev, Forgotten):  # retention passed: the resource leaves the tree too
            rid = row_id(ev)
            if self._rows.pop(rid, None) is not None:
                self._by_source.get(ev.source, set()).discard(rid)
                out.append(({"op": "remove", "id": rid}, None))
        item = self._feed_item(ev)
        if item is not None:
            self._feed.append((item, ev))
            out.append(({"op": "feed", "item": item}, ev))
        return out

    def _rows_of(self, source: str) -> list[_Row]:
        return [self._rows[i] for i in sorted(self._by_source.get(source, ()))]

    def _resource(self, ev: StateChanged | AttributeChanged) -> list[tuple[Op, Event | None]]:
        out: list[tuple[Op, Event | None]] = []
        rid = row_id(ev)
        row = self._rows.get(rid)
        if row is None:
            row = self._rows[rid] = _Row(rid, ev)
            self._by_source.setdefault(ev.source, set()).add(rid)
            while len(self._rows) > self.max_resources:
                old_id, old = self._rows.popitem(last=False)
                self._by_source.get(old.ev.source, set()).discard(old_id)
                self.dropped_rows += 1
                out.append(({"op": "remove", "id": old_id}, None))
        else:
            self._rows.move_to_end(rid)
        if isinstance(ev, StateChanged):
            if ev.seq >= row.ev.seq or not isinstance(row.ev, StateChanged):
                row.ev = ev
            if not row.segments or row.segments[-1][0] != ev.state.value:
                start = ev.time or self._now()
                row.segments.append([ev.state.value, start])
                self._segments.append((rid, start))
                self._prune()
        else:
            row.attrs[f"{ev.kind}:{ev.name}"] = ev
            if ev.kind == "progress" and isinstance(ev.value, (int, float)) and not isinstance(ev.value, bool):
                row.progress = max(0.0, min(100.0, float(ev.value)))
            if not isinstance(row.ev, StateChanged):
                row.ev = ev
        out.append((self._row_op(row), row.ev))
        return out

    def _prune(self) -> None:
        """Drop intervals beyond ``max_timeline`` (the oldest first) and those that ended before
        the window (a row keeps its latest interval however old: it is its current state)."""
        while len(self._segments) > self.max_timeline:
            rid, start = self._segments.popleft()
            row = self._rows.get(rid)
            if row is not None and len(row.segments) > 1 and row.segments[0][1] == start:
                row.segments.pop(0)
        horizon = self._now() - self.window_ns
        while self._segments:
            rid, start = self._segments[0]
            row = self._rows.get(rid)
            if row is None or not row.segments or row.segments[0][1] != start:
                self._segments.popleft()  # its row or interval is gone already
                continue
            if len(row.segments) > 1 and row.segments[1][1] < horizon:
                row.segments.pop(0)
                self._segments.popleft()
                continue
            break

    # -- ops -----------------------------------------------------------------------------------

    def _row_op(self, row: _Row) -> Op:
        ev = row.ev
        stale = self._fresh.staleness(ev.source)
        is_stale = stale is not None and stale.covers(ev.seq)
        state = ev.state.value if isinstance(ev, StateChanged) else "unknown"
        return {"op": "row", "row": {
            "id": row.id, "path": row.path, "backend": ev.backend, "source": ev.source, "key": ev.key,
            "state": state, "native": ev.native if isinstance(ev, StateChanged) else "",
            "reason": _reason(ev), "try": ev.try_no if isinstance(ev, StateChanged) else 0,
            "time": ev.time, "seq": ev.seq, "observed": ev.observed.value,
            "final": isinstance(ev, StateChanged) and ev.state.final,
            "progress": row.progress,
            "attrs": {k: a.value for k, a in sorted(row.attrs.items()) if k != "progress:percent"},
            "stale": stale.describe() if is_stale and stale else "",
            "stale_since": stale.since_time if is_stale and stale else 0,
            "segments": row.segments,
        }}

    def _session_op(self, source: str) -> Op:
        s = dict(self._sessions[source])
        stale = self._fresh.staleness(source)
        s["stale"] = stale.describe() if stale else ""
        return {"op": "session", "session": s}

    @staticmethod
    def _feed_item(ev: Event) -> Op | None:
        kind, level, text = "", "info", ""
        if isinstance(ev, RuleFired):
            kind, text = "rule", f"rule {ev.rule} fired" + (f": {ev.detail}" if ev.detail else "")
        elif isinstance(ev, RecoveryAttempted):
            kind, level = "recovery", "info" if ev.ok else "error"
            text = f"{ev.action} #{ev.attempt} {'ok' if ev.ok else 'FAILED'}" + (
                f" ({ev.reason})" if ev.reason else "") + (f": {ev.detail}" if ev.detail else "")
        elif isinstance(ev, RecoveryGaveUp):
            kind, level, text = "recovery", "error", f"gave up after {ev.attempts} attempt(s): {ev.reason}"
        elif isinstance(ev, ErrorEvent):
            kind, level = "error", "error"
            text = f"{ev.operation + ': ' if ev.operation else ''}{ev.error_type}: {ev.message}"
        elif isinstance(ev, Disconnected):
            kind, level, text = "session", "error", f"disconnected: {ev.reason}"
        elif isinstance(ev, Connected):
            kind, text = "session", "connected" + (f" to {ev.address}" if ev.address else "")
        elif isinstance(ev, PublisherLost):
            kind, level, text = "session", "warning", f"publisher lost (silent {ev.silent_s:.0f} s)"
        elif isinstance(ev, SubscriberLagged):
            kind, level, text = "error", "warning", f"the dashboard lost {ev.lost} event(s) to lag"
        elif isinstance(ev, StateChanged) and ev.state.value == "aborted":
            kind, level, text = "failure", "error", f"aborted: {_reason(ev) or ev.native or 'no reason given'}"
        elif isinstance(ev, LogLine) and ev.level in ("error", "warning", "alert", "critical"):
            kind, level, text = "log", "error" if ev.level != "warning" else "warning", ev.message
        if not kind:
            return None
        return {"kind": kind, "level": level, "text": text[:500], "time": ev.time, "backend": ev.backend,
                "source": ev.source, "key": ev.key}

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self, visible: Callable[[Event], bool] | None = None) -> Op:
        """Everything a browser that connects now needs, the rows and feed items ``visible``
        lets through (all when it is ``None``)."""
        ok = visible or (lambda _ev: True)
        return {"op": "snapshot",
                "rows": [self._row_op(r)["row"] for r in self._rows.values() if ok(r.ev)],
                "feed": [item for item, ev in self._feed if ok(ev)],
                "sessions": [self._session_op(s)["session"] for s in sorted(self._sessions)],
                "window_ns": self.window_ns, "colours": STATE_COLOURS}

    def sessions(self) -> dict[str, str]:
        """The sessions seen so far: name -> backend."""
        out = {s["source"]: s["backend"] for s in self._sessions.values()}
        for r in self._rows.values():
            out.setdefault(r.ev.source, r.ev.backend)
        return out

    def row(self, rid: str) -> Op | None:
        row = self._rows.get(rid)
        return None if row is None else self._row_op(row)["row"]

    def __len__(self) -> int:
        return len(self._rows)


def visible_ops(ops: Iterable[tuple[Op, Event | None]], match: Callable[[Event], bool] | None) -> list[Op]:
    """The ops a browser with the filter ``match`` gets: a row it does not match becomes a
    ``remove`` (it may have matched before), a feed item it does not match is left out."""
    out: list[Op] = []
    for op, ev in ops:
        if match is None or ev is None or match(ev):
            out.append(op)
        elif op["op"] == "row":
            out.append({"op": "remove", "id": op["row"]["id"]})
    return out


__all__ = ["STATE_COLOURS", "DashboardModel", "row_id", "visible_ops"]
