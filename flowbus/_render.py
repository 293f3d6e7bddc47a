"""How events look in a terminal (``watch``, ``status``, ``up``) and as JSON lines."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

import msgspec

from flowbus.schemas import (
    AttributeChanged,
    Connected,
    Disconnected,
    ErrorEvent,
    Event,
    LogLine,
    RecoveryAttempted,
    RecoveryGaveUp,
    RuleFired,
    Snapshot,
    Staleness,
    StateChanged,
    SubscriberLagged,
    WaitSatisfied,
    tag_of,
)

_COLOURS = {
    "complete": "32", "active": "36", "submitted": "34", "queued": "34", "aborted": "31",
    "cancelled": "33", "suspended": "35", "unknown": "37",
}
_json = msgspec.json.Encoder()


def _c(text: str, code: str, on: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if on else text


def event_json(ev: Event, snapshot: Snapshot | None = None) -> str:
    """One event as a JSON object; with the ``snapshot`` it came in, also ``"stale": true|false``
    and, when stale, ``"staleness"`` (source, since_seq, since_time, reason, detail)."""
    data: dict[str, Any] = {"type": tag_of(ev), **msgspec.to_builtins(ev), "topic": ev.topic()}
    if snapshot is not None:
        st = snapshot.staleness(ev)
        data["stale"] = st is not None
        if st is not None:
            data["staleness"] = msgspec.to_builtins(st)
    return _json.encode(data).decode()


def _clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).strftime("%H:%M:%S") if ns else "--:--:--"


def stale_text(st: Staleness) -> str:
    """``stale since 12:00:01 (disconnected: connection refused)``."""
    return f"stale since {_clock(st.since_time)} ({st.describe()})"


def bar(percent: float, width: int = 20) -> str:
    """``[##########----------]  50%``."""
    done = round(max(0.0, min(100.0, percent)) / 100 * width)
    return f"[{'#' * done}{'-' * (width - done)}] {percent:3.0f}%"


class Condenser:
    """What a human live view leaves out, so that a running correlation shows one line per tick
    (its progress bar): heartbeats, per-antenna weights, the info lines of a job whose progress is
    shown, and the key-less copies of a job's info lines. Warnings, errors and every state change
    are always shown; JSON output is never condensed."""

    def __init__(self) -> None:
        self._progressing: set[tuple[str, str]] = set()
        self.hidden = 0

    def shows(self, ev: Event) -> bool:
        where = (ev.source, ev.key)
        if isinstance(ev, AttributeChanged) and ev.kind == "progress":
            self._progressing.add(where)
            return True
        if isinstance(ev, StateChanged) and ev.state.final:
            self._progressing.discard(where)
        quiet = (ev.FAMILY == "heartbeat"
                 or (isinstance(ev, AttributeChanged) and ev.kind == "weight")
                 or (isinstance(ev, LogLine) and ev.level == "info"
                     and (where in self._progressing
                          or (not ev.key and any(s == ev.source for s, _ in self._progressing)))))
        self.hidden += quiet
        return not quiet


def describe(ev: Event) -> tuple[str, str]:
    """(short text, colour code) for one event."""
    if isinstance(ev, StateChanged):
        prev = f"{ev.previous.value} -> " if ev.previous else ""
        extra = f" try={ev.try_no}" if ev.try_no else ""
        detail = f"  {ev.detail}" if ev.detail else ""
        return f"{prev}{ev.state.value} ({ev.native}){extra}{detail}", _COLOURS.get(ev.state.value, "0")
    if isinstance(ev, AttributeChanged):
        if ev.kind == "progress" and isinstance(ev.value, (int, float)) and not isinstance(ev.value, bool):
            return f"progress {bar(float(ev.value))}", "36"
        return f"{ev.kind} {ev.name} = {ev.value!r}", "0"
    if isinstance(ev, LogLine):
        return f"[{ev.level}] {ev.message}", "31" if ev.level in ("error", "alert") else "0"
    if isinstance(ev, Connected):
        return f"connected {ev.address} {ev.detail}".rstrip(), "32"
    if isinstance(ev, Disconnected):
        return f"disconnected: {ev.reason}", "31"
    if isinstance(ev, RecoveryAttempted):
        return f"recovery {ev.action} attempt {ev.attempt} {'ok' if ev.ok else 'failed'} {ev.detail}".rstrip(), "33"
    if isinstance(ev, RecoveryGaveUp):
        return f"recovery gave up after {ev.attempts}: {ev.reason}", "31"
    if isinstance(ev, ErrorEvent):
        return f"error {ev.error_type}: {ev.message}", "31"
    if isinstance(ev, RuleFired):
        return f"rule {ev.rule} fired {ev.detail}".rstrip(), "36"
    if isinstance(ev, WaitSatisfied):
        return f"wait {ev.match} satisfied {ev.detail}".rstrip(), "36"
    if isinstance(ev, SubscriberLagged):
        return f"LAGGED: {ev.lost} events lost ({ev.first_seq}..{ev.last_seq}) {ev.detail}", "31;1"
    return tag_of(ev), "2"


def print_event(ev: Event, as_json: bool = False, out: TextIO = sys.stdout, colour: bool | None = None) -> None:
    if as_json:
        out.write(event_json(ev) + "\n")
    else:
        on = out.isatty() if colour is None else colour
        ts = datetime.fromtimestamp(ev.time / 1e9).strftime("%H:%M:%S.%f")[:-3] if ev.time else "--:--:--"
        text, code = describe(ev)
        head = f"{ts} {ev.backend}/{ev.source} #{ev.seq}"
        obs = "" if ev.observed.value == "push" else f" [{ev.observed.value}]"
        out.write(f"{_c(head, '2', on)} {_c(ev.key or '-', '1', on)} {_c(text, code, on)}{_c(obs, '2', on)}\n")
    out.flush()


def age_text(ns: int, now_ns: int) -> str:
    """How long ago ``ns`` was: ``42s``, ``5m03s``, ``2h14m``, ``3d04h`` (``-`` when unknown)."""
    if not ns:
        return "-"
    left = max(0, (now_ns - ns) // 1_000_000_000)
    if left < 60:
        return f"{left}s"
    if left < 3600:
        return f"{left // 60}m{left % 60:02d}s"
    if left < 86400:
        return f"{left // 3600}h{left % 3600 // 60:02d}m"
    return f"{left // 86400}d{left % 86400 // 3600:02d}h"


def _reason(ev: Event) -> str:
    """Why a resource is in its state, when the backend said (a failed job's exit, a log line)."""
    if isinstance(ev, StateChanged):
        return ev.detail
    if isinstance(ev, Disconnected):
        return ev.reason
    if isinstance(ev, (ErrorEvent, LogLine)):
        return ev.message
    return ""


def print_table(events: Sequence[Event], out: TextIO = sys.stdout, snapshot: Snapshot | None = None,
                colour: bool | None = None, now_ns: int | None = None) -> None:
    """One row per event: what it is, its state, how long ago it was reached (AGE) and why
    (REASON); with ``snapshot``, the last column marks the stale ones (``stale since <time>
    (<why>)``: the row is the last state known, not a current one). Colours (states; stale rows
    dimmed) when ``out`` is a terminal, unless ``colour`` says otherwise."""
    import time

    on = out.isatty() if colour is None else colour
    now = time.time_ns() if now_ns is None else now_ns
    rows = [("BACKEND", "SOURCE", "KEY", "KIND", "STATE", "NATIVE", "AGE", "SEQ", "OBSERVED", "REASON", "FRESHNESS")]
    codes = [""]
    for ev in events:
        st = snapshot.staleness(ev) if snapshot is not None else None
        if isinstance(ev, StateChanged):
            kind, state, native = "state", ev.state.value, ev.native
        elif isinstance(ev, AttributeChanged):
            kind, state, native = f"{ev.kind}:{ev.name}", str(ev.value), ""
        else:
            kind, state, native = tag_of(ev), describe(ev)[0], ""
        reason = " ".join(_reason(ev).split())
        rows.append((ev.backend, ev.source, ev.key or "-", kind, state, native, age_text(ev.time, now), str(ev.seq),
                     ev.observed.value, reason[:60] + ("..." if len(reason) > 60 else ""),
                     stale_text(st) if st is not None else ""))
        codes.append("2" if st is not None else describe(ev)[1])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, (r, code) in enumerate(zip(rows, codes, strict=True)):
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=True)]
        cells[-1] = cells[-1].rstrip()
        if on and i == 0:
            cells = [_c(c, "1", on) for c in cells]  # the header bold
        elif on and code == "2":
            cells = [_c(c, "2", on) for c in cells]  # a stale row dimmed
        elif on:
            cells[4] = _c(cells[4], code, on)  # the state in its colour
        out.write("  ".join(cells).rstrip() + "\n")
