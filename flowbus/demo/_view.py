"""The demo's live view and event record: one subscription to everything, printed as it comes
(condensed for people: heartbeats, weights and a correlating job's info lines left out, its
progress a bar) and kept for the summary's per-stage counts."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from flowbus._render import Condenser, print_event
from flowbus.schemas import Event, Heartbeat, RecoveryAttempted


@dataclass
class StageResult:
    """One row of the summary table."""

    stage: str
    backend: str
    result: str = "pending"  # ok | failed | skipped | pending
    duration: float = 0.0
    events: int = 0
    recoveries: int = 0
    detail: str = ""
    #: what started the stage: "demo" (the demo itself) or "rule <name>" (the Orchestrator)
    started_by: str = ""
    #: (backend, source) pairs whose events count for this stage
    sources: list[tuple[str, str]] = field(default_factory=list)
    #: resource keys whose RecoveryAttempted events count for this stage (substring of the key)
    recovery_keys: list[str] = field(default_factory=list)
    started_ns: int = 0
    ended_ns: int = 0

    def row(self) -> dict[str, Any]:
        return {"stage": self.stage, "backend": self.backend, "result": self.result,
                "duration": round(self.duration, 2), "events": self.events, "recoveries": self.recoveries,
                "started_by": self.started_by, "detail": self.detail}


class LiveView:
    """A thread printing every event of ``subscriber`` and recording it."""

    def __init__(self, subscriber: Any, as_json: bool, out: TextIO = sys.stdout) -> None:
        self.sub, self.as_json, self.out = subscriber, as_json, out
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._seen = threading.Condition(self._lock)
        self._last: dict[str, int] = {}
        self._stop = threading.Event()
        self._condenser = Condenser()
        self._thread = threading.Thread(target=self._run, name="flowbus-demo-view", daemon=True)

    def start(self) -> LiveView:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.sub.recv_many(0.2)
            except Exception:  # noqa: BLE001 - the subscriber was closed under us at shutdown
                return
            for ev in batch or []:
                with self._lock:
                    self.events.append(ev)
                    self._last[ev.source] = max(self._last.get(ev.source, 0), ev.seq)
                    self._seen.notify_all()
                if self.as_json and not isinstance(ev, Heartbeat):
                    print_event(ev, True, self.out)
                elif not self.as_json and self._condenser.shows(ev):
                    print_event(ev, False, self.out)

    def wait_seen(self, ev: Event | None, timeout: float = 3.0) -> bool:
        """Until the view has shown ``ev`` (so stage lines follow the events they report on)."""
        if ev is None:
            return True
        with self._seen:
            return self._seen.wait_for(lambda: self._last.get(ev.source, 0) >= ev.seq, timeout)

    def drain(self, timeout: float = 1.0) -> None:
        """Let events already published reach the view (bounded)."""
        try:
            self.sub.sync()
        except Exception:  # noqa: BLE001 - best effort at the end of a run
            return
        deadline = time.monotonic() + timeout
        n = -1
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.events) == n:
                    break
                n = len(self.events)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def count(self, stage: StageResult) -> None:
        """Fill ``events`` (what the stage's sessions published about its resources: not the
        session's own connected/resynced/heartbeat events) and ``recoveries`` of ``stage``."""
        evs = self.snapshot()
        stage.events = sum(1 for e in evs if (e.backend, e.source) in stage.sources
                           and e.FAMILY not in ("session", "heartbeat", "resync"))
        stage.recoveries = sum(1 for e in evs if isinstance(e, RecoveryAttempted)
                               and any(k in e.key for k in stage.recovery_keys))


def print_summary(stages: list[StageResult], out: TextIO) -> None:
    rows = [("STAGE", "BACKEND", "RESULT", "DURATION", "EVENTS", "RECOVERIES", "STARTED BY", "DETAIL")]
    for s in stages:
        rows.append((s.stage, s.backend, s.result, f"{s.duration:.1f} s", str(s.events), str(s.recoveries),
                     s.started_by or "-", s.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out.write("\n")
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() + "\n")
    out.flush()
