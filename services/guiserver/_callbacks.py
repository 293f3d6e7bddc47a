"""The DiFX Python interface's callback types as plain Python callbacks on top of the bus.

What the guiServer session publishes (``_events``) and what each callback is given:

* ``on_message(LogLine)``: ``level=info`` lines (job stdout ``DIFX_MESSAGE``, server INFORMATION,
  info/INFO alerts, DifxInfoMessage);
* ``on_warning(LogLine)``: ``level=warning`` (job ``DIFX_WARNING``, server WARNING, WARNING alerts);
* ``on_error(LogLine)``: ``level=error`` or ``critical`` (job ``DIFX_ERROR``, server ERROR,
  ERROR/SEVERE/FATAL alerts);
* ``on_final(StateChanged)``: the job's final state (complete, aborted, cancelled), or ``unknown``
  when a server crash lost it for good (``attrs["unrecoverable"]`` is true and ``detail`` says why:
  nothing will tell how the job ended; should its real end still turn up, after a lost connection
  rather than a crash, ``on_final`` is called again with it);
* ``on_timeout()``: nothing was published about the job for ``timeout`` seconds (called once per
  silent stretch; the next event of the job re-arms it);
* ``on_interval()``: every ``interval`` seconds while the job runs (until its final state).

With ``job`` the log and state callbacks see only events whose key is that job (job output,
relayed messages of that job); the server's own lines (key ``""``) are not about a job. With
``job=None`` every log line and every final state of the session is delivered, and timeout and
interval run until :meth:`DifxCallbacks.cancel`.

One ``client.on`` subscription (``guiserver/<session>/*``) feeds every callback, so they are called
in publication order (a job's last warning before its final state) from one thread; timeout and
interval run in a second thread. Both are joined by :meth:`cancel` (also on ``with`` exit). The
subscription is live: events published before the constructor returned are not delivered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Self

import structlog

from flowbus.bus import Client, Match
from flowbus.schemas import Event, LogLine, StateChanged

BACKEND = "guiserver"

#: LogLine levels per callback (``_events`` levels: info, warning, error, critical, debug)
LEVELS: dict[str, frozenset[str]] = {
    "message": frozenset({"info"}),
    "warning": frozenset({"warning"}),
    "error": frozenset({"error", "critical"}),
}

_log = structlog.get_logger("flowbus.guiserver.callbacks")


class DifxCallbacks:
    """Callbacks for one guiServer session (and optionally one job) of a broker ``client``.

    ``matches`` holds the match expressions used (for logs and ``flowbus wait``-style reuse);
    ``calls`` counts the calls per callback name; ``errors`` keeps the text of every exception a
    callback raised (a failing callback never stops the others). ``final`` is the job's final
    ``StateChanged`` once seen; :meth:`wait_final` blocks for it.
    """

    def __init__(self, client: Client, session: str, job: str | None = None, *,
                 on_message: Callable[[LogLine], Any] | None = None,
                 on_warning: Callable[[LogLine], Any] | None = None,
                 on_error: Callable[[LogLine], Any] | None = None,
                 on_final: Callable[[StateChanged], Any] | None = None,
                 on_timeout: Callable[[], Any] | None = None, timeout: float | None = None,
                 on_interval: Callable[[], Any] | None = None, interval: float | None = None) -> None:
        if not session or "/" in session:
            raise ValueError(f"session {session!r}: must be non-empty and contain no '/'")
        if job is not None and not job:
            raise ValueError("job: give a job name or None")
        if on_timeout is not None and (timeout is None or timeout <= 0):
            raise ValueError("on_timeout needs timeout > 0")
        if on_interval is not None and (interval is None or interval <= 0):
            raise ValueError("on_interval needs interval > 0")
        self.session, self.job = session, job
        self.timeout = timeout if on_timeout is not None else None
        self.interval = interval if on_interval is not None else None
        self.calls: dict[str, int] = {"message": 0, "warning": 0, "error": 0, "final": 0, "timeout": 0, "interval": 0}
        self.errors: list[str] = []
        self.final: StateChanged | None = None
        self._funcs: dict[str, Callable[..., Any] | None] = {
            "message": on_message, "warning": on_warning, "error": on_error, "final": on_final,
            "timeout": on_timeout, "interval": on_interval}
        base = f"{BACKEND}/{session}"
        key = (lambda e: e.key == job) if job is not None else None
        slot = job if job is not None else "*"
        self.matches: dict[str, Match] = {
            name: Match(f"{base}/log/{_glob(slot)} type=log level={'|'.join(sorted(levels))}", key)
            for name, levels in LEVELS.items()
        }
        self.matches["final"] = Match(f"{base}/state/{_glob(slot)} type=state final=true", key)
        #: a job whose state a server crash lost for good is as final for its callbacks
        self.matches["lost"] = Match(f"{base}/state/{_glob(slot)} type=state state=unknown",
                                     lambda e: _unrecoverable(e) and (key is None or key(e)))
        #: anything about the job (or the session): resets the timeout
        self.matches["activity"] = Match(f"{base}/*", key)
        self._cond = threading.Condition()
        self._last = time.monotonic()
        self._timed_out = False
        self._done = False  # final seen (job) or cancelled: the timer stops
        self._cancelled = False
        self._timer: threading.Thread | None = None
        self._callback = client.on(Match(f"{base}/*", key), self._on_event)
        if self.timeout is not None or self.interval is not None:
            self._timer = threading.Thread(target=self._tick, daemon=True,
                                           name=f"flowbus-difx-callbacks:{session}/{job or '*'}")
            self._timer.start()

    # -- public ----------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while the timeout/interval thread runs (until the job's final state or cancel)."""
        return self._timer is not None and self._timer.is_alive()

    def wait_final(self, timeout: float | None = None) -> StateChanged | None:
        """The job's final state, waiting up to ``timeout`` seconds (None if not seen by then)."""
        with self._cond:
            self._cond.wait_for(lambda: self.final is not None or self._cancelled, timeout)
            return self.final

    def cancel(self) -> None:
        """Stop every callback; joins both threads (idempotent; safe from inside a callback)."""
        with self._cond:
            self._cancelled = self._done = True
            self._cond.notify_all()
        me = threading.current_thread()
        if self._timer is not None and self._timer is not me:
            self._timer.join(5)
        cb = self._callback
        if cb._thread is not me:
            cb.cancel()
        else:
            cb._stop.set()  # inside our own event callback: the thread ends after this call

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    # -- internals -------------------------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        with self._cond:
            if self._cancelled:
                return
            self._last = time.monotonic()
            self._timed_out = False
            self._cond.notify_all()
        for name in ("message", "warning", "error"):
            if self.matches[name](ev):
                self._call(name, ev)
        if self.matches["final"](ev) or self.matches["lost"](ev):
            assert isinstance(ev, StateChanged)
            with self._cond:
                if self.job is not None:
                    self.final = ev
                    self._done = True
                self._cond.notify_all()
            self._call("final", ev)

    def _call(self, name: str, *args: Any) -> None:
        func = self._funcs[name]
        if func is None:
            return
        self.calls[name] += 1
        try:
            func(*args)
        except Exception as exc:  # noqa: BLE001 - one failing callback must not stop the others
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            _log.error("difx_callbacks.failed", callback=name, session=self.session, job=self.job, error=repr(exc))

    def _tick(self) -> None:
        next_interval = time.monotonic() + self.interval if self.interval is not None else None
        while True:
            fire: list[str] = []
            with self._cond:
                while not self._done:
                    now = time.monotonic()
                    due = []
                    if self.timeout is not None and not self._timed_out:
                        due.append(self._last + self.timeout)
                    if next_interval is not None:
                        due.append(next_interval)
                    if not due:
                        self._cond.wait()
                        continue
                    when = min(due)
                    if when > now:
                        self._cond.wait(when - now)
                        continue
                    if self.timeout is not None and not self._timed_out and now >= self._last + self.timeout:
                        self._timed_out = True
                        fire.append("timeout")
                    if next_interval is not None and now >= next_interval:
                        fire.append("interval")
                        assert self.interval is not None
                        next_interval += self.interval * max(1, int((now - next_interval) // self.interval) + 1)
                    break
                else:
                    return
            for name in fire:
                self._call(name)


def _glob(key: str) -> str:
    """A key inside a topic glob: ``*`` stays a wildcard; a job's glob characters are made
    literal by ``[x]`` classes (the key predicate checks the exact key anyway)."""
    if key == "*":
        return key
    return "".join(f"[{c}]" if c in "*?[" else c for c in key)


__all__ = ["LEVELS", "DifxCallbacks"]


def _unrecoverable(ev: Event) -> bool:
    return isinstance(ev, StateChanged) and ev.attrs.get("unrecoverable") is True
