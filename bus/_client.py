"""The user's handle on the bus: ``flowbus.connect(address)``."""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq

from flowbus.schemas import (
    BusBroken,
    CurveConfig,
    Event,
    Forgotten,
    Freshness,
    ResourceForgotten,
    Snapshot,
    Staleness,
    WaitTimeout,
    decode,
    watch_prefixes,
)

from ._command_client import Commander
from ._curve import ClientCurve
from ._match import Match, as_match
from ._request import Requester, same_host
from ._subscriber import Start, Subscriber
from ._verify import snapshot_events

log = structlog.get_logger("flowbus.client")

def _refused(reason: str, detail: str) -> None:
    """A snapshot entry that is not what the journal filed it as: left out, and said so."""
    log.warning("client.snapshot.refused", reason=reason, detail=detail[:300])


def default_address() -> str:
    """The embedded default's request endpoint: ``ipc://<state-dir>/bus/request``, the state dir
    being ``$FLOWBUS_STATE_DIR`` or ``~/.local/state/flowbus``."""
    state = Path(os.environ.get("FLOWBUS_STATE_DIR") or "~/.local/state/flowbus").expanduser()
    return f"ipc://{state.absolute() / 'bus' / 'request'}"


class Client:
    """Subscriptions, callbacks, waits, state queries and commands against one broker."""

    def __init__(self, address: str | None = None, *, curve: ClientCurve | CurveConfig | None = None,
                 timeout: float = 5.0) -> None:
        self.address = address or default_address()
        self.curve = ClientCurve.from_config(curve) if isinstance(curve, CurveConfig) else curve
        self.timeout = timeout
        self._req = Requester(zmq.Context.instance(), self.address, self.curve, timeout)
        self._lock = threading.Lock()
        self._callbacks: list[Callback] = []
        self._commander: Commander | None = None
        self._cmd_lock = threading.Lock()
        self.info = self._call("info")

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        with self._lock:
            return self._req.call(op, **args)

    # -- streams -------------------------------------------------------------------------------------

    def subscribe(self, prefix: str | Sequence[str] = "", *, start: Start = "live") -> Subscriber:
        """Typed events whose topic starts with ``prefix`` (iterate it; close it when done)."""
        return Subscriber(self.address, prefix, start=start, curve=self.curve, timeout=self.timeout)

    def on(self, match: str | Match, callback: Callable[[Event], Any], *, start: Start = "live") -> Callback:
        """Call ``callback(event)`` in a background thread for every matching event."""
        cb = Callback(self, as_match(match), callback, start)
        self._callbacks.append(cb)
        return cb

    def expect(self, match: str | Match, timeout: float = 30.0) -> Expectation:
        """Arm a wait *before* acting: ``with client.expect(m) as w: act()``; ``w.event`` after."""
        return Expectation(self, as_match(match), timeout)

    def wait(self, match: str | Match, timeout: float = 30.0) -> Event:
        """Block until a matching event arrives or the current state matches; raise ``WaitTimeout``."""
        with self.expect(match, timeout) as w:
            pass
        assert w.event is not None
        return w.event

    # -- queries ---------------------------------------------------------------------------------------

    def status(self, prefix: str = "") -> list[Event]:
        """The latest state of every resource whose topic starts with ``prefix`` (stale ones
        included: :meth:`snapshot` says which)."""
        return self.snapshot(prefix).events

    def snapshot(self, prefix: str | Sequence[str] = "") -> Snapshot:
        """:meth:`status` with staleness, from one broker request: ``.events`` (sorted by backend,
        source, key), ``.stale`` (per source whose held resource states no longer count as
        current, a ``Staleness``: why and since when), ``.is_stale(ev)``, ``.stale_topics()``."""
        prefixes = [prefix] if isinstance(prefix, str) else list(prefix) or [""]
        reply = self._call("snapshot", prefixes=prefixes)
        events = sorted(snapshot_events(reply, _refused), key=lambda e: (e.backend, e.source, e.key, e.seq))
        stale = {str(s): msgspec.convert(v, Staleness) for s, v in (reply.get("stale") or {}).items()}
        return Snapshot(events=events, stale=stale, forgotten=[decode(p) for p in reply.get("forgotten") or ()])

    def marks(self) -> dict[str, list[Any]]:
        """Per source: [backend, epoch, last seq, oldest seq held]."""
        return self._call("marks")["sources"]  # type: ignore[no-any-return]  # the broker's msgpack reply

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    # -- commands ------------------------------------------------------------------------------------

    def call(self, session: str, operation: str, args: list[Any] | tuple[Any, ...] = (),
             kwargs: dict[str, Any] | None = None, *, timeout: float = 300.0) -> Any:
        """Run ``operation`` on ``session`` through the Supervisor of the ``flowbus up`` serving
        this bus (so a session that moved is still reached); returns its result. Raises the
        session's own error (``UnknownSession``, ``UnknownOperation``, ``BackendRejected``, ...)
        or ``BusBroken`` when nothing serves commands or no answer comes within ``timeout``."""
        return self.command("call", timeout=timeout, session=session, operation=operation,
                            args=list(args), kwargs=dict(kwargs or {}))

    def command(self, op: str, *, timeout: float = 60.0, **args: Any) -> Any:
        """A command to the serving ``flowbus up``: ``call``, ``sessions``, ``rules``."""
        endpoint = self.info.get("command")
        if not endpoint:
            raise BusBroken(f"the broker at {self.address} has no command socket (an older broker?)")
        with self._cmd_lock:
            if self._commander is None:
                self._commander = Commander(zmq.Context.instance(), same_host(str(endpoint), self.address), self.curve)
            return self._commander.call(op, timeout, **args)

    def close(self) -> None:
        for cb in self._callbacks:
            cb.cancel()
        self._callbacks.clear()
        with self._lock:
            self._req.close()
        with self._cmd_lock:
            if self._commander is not None:
                self._commander.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def forgotten_prefixes(prefix: str) -> list[str]:
    """The ``Forgotten`` topics a wait under ``prefix`` (a resource's state or attributes) must
    follow besides it (none when ``prefix`` already covers them)."""
    parts = prefix.split("/", 3)
    if len(parts) < 3 or parts[2] not in ("state", "attr"):
        return []
    key = parts[3] if len(parts) > 3 else ""
    if parts[2] == "attr":
        key = ""  # attribute slots are key/kind/name: the key alone is not known from a prefix
    return [f"{parts[0]}/{parts[1]}/forgotten/{key}"]


class Expectation:
    """A wait armed before the caller acts.

    Arming subscribes and then reads the snapshot. On exit (after the caller acted) it catches
    up with the broker, applies every event seen since arming, and is satisfied by a matching
    *event* seen since arming or by a matching *current* state — a state that a newer event has
    replaced does not count, so a resubmitted job's old final state cannot satisfy it, and nor
    does a *stale* one (its session lost the backend, is resyncing, or its publisher fell silent:
    see ``flowbus.schemas._freshness``) until a newer event or the end of the resync makes it
    count again. The subscription also follows the session, resync and liveness slots of the
    sources it covers, for that.
    """

    def __init__(self, client: Client, match: Match, timeout: float) -> None:
        self.client, self.match, self.timeout = client, match, timeout
        self.event: Event | None = None
        self._sub: Subscriber | None = None
        self._state: dict[str, Event] = {}
        self._fresh = Freshness()
        self._fresher = False  # a source's staleness changed since held states were last looked at
        #: the awaited resource was forgotten by its session (only for a wait on one resource)
        self._forgotten: Forgotten | None = None

    def __enter__(self) -> Expectation:
        self._deadline = time.monotonic() + self.timeout
        prefixes = [self.match.prefix, *watch_prefixes(self.match.prefix), *forgotten_prefixes(self.match.prefix)]
        self._sub = self.client.subscribe(prefixes)
        try:
            snap = self.client.snapshot(prefixes)
            for ev in snap.forgotten:
                self._apply(ev)
            for ev in snap.events:
                self._apply(ev)
        except BaseException:
            self._sub.close()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        sub = self._sub
        assert sub is not None
        try:
            if exc_type is None:
                self.event = self._resolve(sub)
        finally:
            sub.close()

    def _apply(self, ev: Event) -> bool:
        if isinstance(ev, Forgotten):
            self._forget(ev)
            return False
        if self._forgotten is not None and ev.STATEFUL and ev.key == self._forgotten.key:
            self._forgotten = None  # the name was used again
        held = self._state.get(ev.topic())
        if ev.STATEFUL and (held is None or (held.source, held.seq) <= (ev.source, ev.seq) or held.source != ev.source):
            self._state[ev.topic()] = ev
        if self._fresh.apply(ev):
            self._fresher = True
        return self.match(ev)

    def _forget(self, ev: Forgotten) -> None:
        """Drop the forgotten resource's held states (the cache stays bounded by retention);
        remember it when it is the one resource this wait is about."""
        base = f"{ev.backend}/{ev.source}/"
        for topic in [t for t, held in self._state.items()
                      if held.key == ev.key and held.source == ev.source and t.startswith(base)]:
            del self._state[topic]
        if self.match.exact and (self.match.topic_matches(f"{base}state/{ev.key}")
                                 or self.match.glob.startswith(f"{base}attr/{ev.key}/")):
            self._forgotten = ev

    def _check_forgotten(self) -> None:
        gone = self._forgotten
        if gone is not None:
            last = gone.last_state.value if gone.last_state is not None else ""
            raise ResourceForgotten(str(self.match), f"{gone.backend}/{gone.source}/state/{gone.key}", last)

    def _current(self) -> Event | None:
        """A held state that matches and is not stale."""
        self._fresher = False
        for ev in self._state.values():
            if self.match(ev) and not self._fresh.is_stale(ev):
                return ev
        return None

    def _stale_detail(self) -> str:
        """For a timeout: the matching held states that did not count because they are stale."""
        stale = [ev for ev in self._state.values() if self.match(ev) and self._fresh.is_stale(ev)]
        if not stale:
            return ""
        st = self._fresh.staleness(stale[0].source)
        why = f" ({st.source}: {st.describe()})" if st is not None else ""
        return f"{len(stale)} matching state(s) held but stale, e.g. {stale[0].topic()}{why}"

    def _resolve(self, sub: Subscriber) -> Event:
        sub.sync()  # everything the broker had when the caller finished acting
        while True:
            ev = sub.recv(0)
            if ev is None:
                break
            if self._apply(ev):
                return ev
        found = self._current()
        if found is not None:
            return found
        self._check_forgotten()
        while True:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(str(self.match), self.timeout, self._stale_detail())
            ev = sub.recv(left)
            if ev is None:
                continue
            if self._apply(ev):
                return ev
            self._check_forgotten()
            if self._fresher and (found := self._current()) is not None:
                return found  # a resync ended (or the publisher is back): held states count again


class Callback:
    """A running ``client.on(...)``: events are handled in a background thread until ``cancel()``."""

    def __init__(self, client: Client, match: Match, func: Callable[[Event], Any], start: Start) -> None:
        self.match, self.func = match, func
        self.calls = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(client, start), daemon=True,
                                        name=f"flowbus-on:{match}")
        self._thread.start()
        self._ready.wait(client.timeout + 1)
        if self._failure is not None:
            raise self._failure

    def _run(self, client: Client, start: Start) -> None:
        try:
            sub = client.subscribe(self.match.prefix, start=start)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        with sub:
            while not self._stop.is_set():
                ev = sub.recv(0.1)
                if ev is None or not self.match(ev):
                    continue
                self.calls += 1
                try:
                    self.func(ev)
                except Exception as exc:  # noqa: BLE001 - a failing callback must not stop the stream
                    self.errors.append("".join(traceback.format_exception_only(exc)).strip())
                    log.error("callback.failed", match=str(self.match), error=self.errors[-1])

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> Callback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
