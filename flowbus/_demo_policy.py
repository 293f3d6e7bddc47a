"""A recovery policy run by the demo itself, used only when flowbus has no Orchestrator (the
rules engine) to run the demo's ``[[policies]]``: an aborted ecFlow task of the demo suite is
requeued with ecFlow's own operation, at most ``max_attempts`` times, and every attempt is
published as ``RecoveryAttempted`` (a ``RecoveryGaveUp`` after the last)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog

from flowbus.schemas import Event, FlowbusError, RecoveryAttempted, RecoveryGaveUp, StateChanged

log = structlog.get_logger("flowbus.demo.policy")

SOURCE = "demo-policy"


class RequeuePolicy:
    """``client.on(match)`` -> requeue the aborted task through ``call``; events via ``publisher``."""

    def __init__(self, client: Any, publisher: Any, call: Callable[..., Any], match: str, session: str,
                 max_attempts: int = 2) -> None:
        self.client, self.publisher, self.call = client, publisher, call
        self.match, self.session, self.max_attempts = match, session, max_attempts
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._handle: Any = None

    def start(self) -> RequeuePolicy:
        self.publisher.open_source(SOURCE, "flowbus")
        self._handle = self.client.on(self.match, self._on_abort)
        return self

    def _on_abort(self, ev: Event) -> None:
        if not isinstance(ev, StateChanged):
            return
        with self._lock:
            n = self.attempts.get(ev.key, 0) + 1
            self.attempts[ev.key] = n
        reason = f"{self.session}:{ev.key} aborted ({ev.native}, try {ev.try_no})"
        if n > self.max_attempts:
            self.publisher.publish(RecoveryGaveUp(source=SOURCE, backend="flowbus", key=ev.key, attempts=n - 1,
                                                  reason=reason))
            self.publisher.flush()
            return
        ok, detail = True, ""
        try:
            self.call(self.session, "requeue", ev.key)
        except FlowbusError as exc:
            ok, detail = False, str(exc)[:200]
        log.info("demo.policy.requeued", key=ev.key, attempt=n, ok=ok)
        self.publisher.publish(RecoveryAttempted(source=SOURCE, backend="flowbus", key=ev.key, action="requeue",
                                                 attempt=n, reason=reason, ok=ok, detail=detail))
        self.publisher.flush()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
