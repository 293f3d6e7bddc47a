"""BackendActor: a Ray actor that hosts many adapter sessions and publishes their events.

Each session gets a poll thread of its own (one stalled backend never stalls the others) and
commands run in a thread pool, so the actor's event loop stays free for pings. After a Ray
restart the constructor runs again with the same session specs; ``start()`` (called by the
Supervisor's watchdog, or lazily by the first command) reopens every session: the broker grants a
new epoch and the journal's next seq, the journal's snapshot tells the session what the bus
knew, and the session publishes what changed meanwhile with ``observed=resync``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import structlog

from . import _ray  # noqa: F401  (sets the loopback fences before ray is imported)
import ray  # noqa: E402, I001

from flowbus.bus import Publisher  # noqa: E402
from flowbus.bus._request import Requester  # noqa: E402
from flowbus.schemas import (  # noqa: E402
    Connected,
    ErrorEvent,
    Event,
    FlowbusError,
    Heartbeat,
    SessionConfig,
    StateChanged,
    UnknownSession,
    decode,
)
from flowbus.services import BackendSession, session_for  # noqa: E402

log = structlog.get_logger("flowbus.actor")

HEARTBEAT_EVERY = 10.0


class _Hosted:
    """One session inside the actor, with its poll thread."""

    def __init__(self, spec: SessionConfig, session: BackendSession, publisher: Publisher) -> None:
        self.spec, self.session, self.publisher = spec, session, publisher
        self.stop_flag = threading.Event()
        self.thread: threading.Thread | None = None
        self.poll_errors = 0
        self.started_at = time.time()

    def emit(self, event: Event) -> None:
        self.publisher.publish(event)

    def run_polls(self) -> None:
        bound = log.bind(session_id=self.spec.name, backend=self.session.backend)
        next_beat = time.monotonic() + HEARTBEAT_EVERY
        while not self.stop_flag.is_set():
            try:
                delay = self.session.poll()
            except Exception as exc:  # noqa: BLE001 - a failing poll is published, the loop goes on
                self.poll_errors += 1
                bound.error("session.poll.failed", error=str(exc))
                self.emit(ErrorEvent(source=self.spec.name, backend=self.session.backend, operation="poll",
                                     error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                                     message=str(exc), args=[str(a) for a in exc.args]))
                delay = 1.0
            now = time.monotonic()
            if now >= next_beat:
                self.emit(Heartbeat(source=self.spec.name, backend=self.session.backend))
                next_beat = now + HEARTBEAT_EVERY
            self.stop_flag.wait(max(0.005, min(delay, 1.0)))


class BackendActorImpl:
    """The actor's body (plain class, so tests can also run it in-process)."""

    def __init__(self, name: str, broker_address: str, specs: list[dict[str, Any]], curve: Any = None) -> None:
        # configuration only: no I/O here (a failing constructor surfaces as an opaque actor death)
        self.actor_name = name
        self.broker_address = broker_address
        self.specs = list(specs)
        self.curve = curve
        self._hosted: dict[str, _Hosted] = {}
        self._publisher: Publisher | None = None
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"flowbus-{name}")
        self._start_lock = asyncio.Lock()
        self._started = False

    async def start(self) -> dict[str, Any]:
        """Open the publisher and every configured session (idempotent)."""
        async with self._start_lock:
            if not self._started:
                loop = asyncio.get_running_loop()
                self._publisher = await loop.run_in_executor(self._pool, lambda: Publisher(self.broker_address, curve=self.curve))
                for spec in self.specs:
                    await self._open(spec)
                self._started = True
        return await self.ping()

    async def _open(self, raw: dict[str, Any]) -> None:
        spec: SessionConfig = msgspec.convert(raw, SessionConfig)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._open_sync, spec)

    def _open_sync(self, spec: SessionConfig) -> None:
        assert self._publisher is not None
        session = session_for(spec)
        epoch, next_seq = self._publisher.open_source(spec.name, session.backend)
        known, previous_address = self._known(spec.name, session.backend)
        hosted = _Hosted(spec, session, self._publisher)
        log.info("session.opening", session_id=spec.name, epoch=epoch, next_seq=next_seq, known=len(known))
        session.start(hosted.emit, known, previous_address=previous_address)
        self._publisher.flush()
        hosted.thread = threading.Thread(target=hosted.run_polls, name=f"poll-{spec.name}", daemon=True)
        hosted.thread.start()
        self._hosted[spec.name] = hosted

    def _known(self, source: str, backend: str) -> tuple[dict[str, StateChanged], str | None]:
        """What the journal's snapshot says about this source: states, and the last address."""
        import zmq

        req = Requester(zmq.Context.instance(), self.broker_address, self.curve)
        try:
            events = [decode(p) for p in req.call("snapshot", prefixes=[f"{backend}/{source}/"])["events"]]
        finally:
            req.close()
        known = {e.key: e for e in events if isinstance(e, StateChanged)}
        conn = [e for e in events if isinstance(e, Connected)]
        return known, (conn[0].address or None) if conn else None

    async def add_session(self, spec: dict[str, Any]) -> dict[str, Any]:
        await self.start()
        name = spec.get("name")
        if name in self._hosted:
            raise FlowbusError(f"session {name!r} is already hosted by {self.actor_name}")
        self.specs.append(spec)
        await self._open(spec)
        return await self.ping()

    async def call(self, session: str, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one backend operation; returns after the events it caused are journaled."""
        await self.start()
        hosted = self._hosted.get(session)
        if hosted is None:
            raise UnknownSession(session)
        loop = asyncio.get_running_loop()

        def run() -> Any:
            result = hosted.session.call(operation, *args, **kwargs)
            assert self._publisher is not None
            self._publisher.flush(source=session)
            return result

        return await loop.run_in_executor(self._pool, run)

    async def operations(self, session: str) -> list[str]:
        await self.start()
        hosted = self._hosted.get(session)
        if hosted is None:
            raise UnknownSession(session)
        return list(hosted.session.operations())

    async def ping(self) -> dict[str, Any]:
        pub = self._publisher
        return {"actor": self.actor_name, "pid": os.getpid(), "started": self._started,
                "sessions": sorted(self._hosted), "bus_connected": bool(pub and pub.connected()),
                "publisher": dict(pub.stats) if pub else {}}

    async def remove_session(self, session: str) -> None:
        hosted = self._hosted.pop(session, None)
        if hosted is None:
            raise UnknownSession(session)
        self.specs = [s for s in self.specs if s.get("name") != session]
        await asyncio.get_running_loop().run_in_executor(self._pool, self._stop_one, hosted)

    def _stop_one(self, hosted: _Hosted) -> None:
        hosted.stop_flag.set()
        if hosted.thread is not None:
            hosted.thread.join(10)
        try:
            hosted.session.stop()
        except Exception as exc:  # noqa: BLE001 - stop the others anyway
            log.error("session.stop.failed", session_id=hosted.spec.name, error=str(exc))
        if self._publisher is not None:
            try:
                self._publisher.flush(2.0, source=hosted.spec.name)
            except FlowbusError:
                pass
            self._publisher.close_source(hosted.spec.name)

    async def stop(self) -> None:
        """Graceful: stop every session (their processes end), flush, close the publisher."""
        loop = asyncio.get_running_loop()
        hosted = list(self._hosted.values())
        self._hosted.clear()
        await asyncio.gather(*(loop.run_in_executor(self._pool, self._stop_one, h) for h in hosted))
        if self._publisher is not None:
            await loop.run_in_executor(self._pool, self._publisher.close, 2.0)
            self._publisher = None
        self._started = False

    def kill(self) -> None:
        """Best effort, immediate; never raises."""
        for hosted in list(self._hosted.values()):
            hosted.stop_flag.set()
            try:
                hosted.session.kill()
            except Exception as exc:  # noqa: BLE001
                log.error("session.kill.failed", session_id=hosted.spec.name, error=str(exc))
        self._hosted.clear()


BackendActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)(  # type: ignore[call-overload]  # Ray's stubs lack actor options
    BackendActorImpl)
