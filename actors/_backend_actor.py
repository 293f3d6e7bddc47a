"""BackendActor: a Ray actor that hosts many adapter sessions and publishes their events.

Sessions are polled by a :class:`~._scheduler.PollScheduler`: a heap of next-poll times feeding a
bounded pool of worker threads (``poll_workers``, default 16). A session whose poll blocks (a
frozen backend) holds one worker and is not rescheduled while in flight; the others go on, and
``ping()`` names it under ``stuck``, as it names a session whose own probe finds its backend
not answering (ecFlow's ``stuck_for()``). Each session still emits a ``Heartbeat`` every
``HEARTBEAT_EVERY`` seconds (after a poll that is due for one; start times are spread).
Commands run in a separate thread pool, so the actor's event loop stays free for pings.

Opening many sessions is batched: one registration round for every source on the publisher,
one journal snapshot for all of them, then ``session.start()`` for up to ``open_concurrency``
sessions at a time, and one flush. After a Ray restart the constructor runs again with the same
session specs; ``start()`` (called by the Supervisor's watchdog, or lazily by the first
command) reopens every session: the broker grants a new epoch and the journal's next seq, the
journal's snapshot tells the session what the bus knew, and the session publishes what changed
meanwhile with ``observed=resync``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import structlog

from . import _ray  # noqa: F401  (sets the loopback fences before ray is imported)

# isort: split
import ray

from flowbus.bus import Publisher, Requester
from flowbus.schemas import (
    BackendUnavailable,
    Connected,
    ErrorEvent,
    Event,
    Fenced,
    FlowbusError,
    Heartbeat,
    SessionConfig,
    SourceRefused,
    StateChanged,
    UnknownSession,
    decode,
)
from flowbus.services import BackendSession, session_for

from ._scheduler import PollScheduler

log = structlog.get_logger("flowbus.actor")

HEARTBEAT_EVERY = 10.0
POLL_WORKERS = 16
OPEN_CONCURRENCY = 8
#: a poll in flight for longer than this is reported under ``stuck`` by ping()
STUCK_AFTER = 5.0


class _Hosted:
    """One session inside the actor: what its scheduled poll needs."""

    def __init__(self, spec: SessionConfig, session: BackendSession, publisher: Publisher) -> None:
        self.spec, self.session, self.publisher = spec, session, publisher
        self.poll_errors = 0
        self.started_at = time.time()
        # spread the heartbeats of sessions opened together over one period
        self.next_beat = time.monotonic() + HEARTBEAT_EVERY * (0.5 + random.random() / 2)
        self._log = log.bind(session_id=spec.name, backend=session.backend)

    #: set once the broker fenced this session (a newer incarnation owns it), and who to tell
    fenced: bool = False
    on_fenced: Callable[[_Hosted], None] | None = None

    def emit(self, event: Event) -> None:
        try:
            self.publisher.publish(event)
        except Fenced:
            # the supervisor moved this session while we were unreachable: the broker rejects us
            first, self.fenced = not self.fenced, True
            if first and self.on_fenced is not None:
                self.on_fenced(self)

    def poll_once(self) -> float:
        """One scheduled turn: poll, publish a failure as ``ErrorEvent``, heartbeat when due;
        returns the delay until the next turn."""
        try:
            delay = self.session.poll()
        except Exception as exc:  # noqa: BLE001 - a failing poll is published, the schedule goes on
            self.poll_errors += 1
            self._log.error("session.poll.failed", error=str(exc))
            self.emit(ErrorEvent(source=self.spec.name, backend=self.session.backend, operation="poll",
                                 error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                                 message=str(exc), args=[str(a) for a in exc.args]))
            delay = 1.0
        now = time.monotonic()
        if now >= self.next_beat:
            self.emit(Heartbeat(source=self.spec.name, backend=self.session.backend))
            self.next_beat = now + HEARTBEAT_EVERY
        return delay


class BackendActorImpl:
    """The actor's body (plain class, so tests can also run it in-process)."""

    def __init__(self, name: str, broker_address: str, specs: list[dict[str, Any]], curve: Any = None, *,
                 poll_workers: int = POLL_WORKERS, open_concurrency: int = OPEN_CONCURRENCY,
                 stuck_after: float = STUCK_AFTER, grants: dict[str, list[Any]] | None = None) -> None:
        # configuration only: no I/O here (a failing constructor surfaces as an opaque actor death)
        self.actor_name = name
        #: per session, the source grant the Supervisor made (the broker takes a session's source
        #: only with it); a session without one opens as a user source
        self.grants: dict[str, list[Any]] = dict(grants or {})
        self.broker_address = broker_address
        self.specs = list(specs)
        self.curve = curve
        self.poll_workers = max(1, int(poll_workers))
        self.open_concurrency = max(1, int(open_concurrency))
        self.stuck_after = float(stuck_after)
        self._hosted: dict[str, _Hosted] = {}
        self._publisher: Publisher | None = None
        self._scheduler: PollScheduler | None = None
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"flowbus-{name}")
        self._start_lock = asyncio.Lock()
        self._started = False
        #: commands running per session, and sessions being handed over (they take no new command)
        self._inflight: dict[str, int] = {}
        self._handing: set[str] = set()
        self._idle: asyncio.Condition | None = None

    async def start(self) -> dict[str, Any]:
        """Open the publisher and every configured session (idempotent). When sessions fail to
        open, the others are opened anyway and the first failure is raised."""
        async with self._start_lock:
            if not self._started:
                loop = asyncio.get_running_loop()
                if self._publisher is None:
                    self._publisher = await loop.run_in_executor(
                        self._pool, lambda: Publisher(self.broker_address, curve=self.curve))
                if self._scheduler is None:
                    self._scheduler = PollScheduler(self.poll_workers, name=f"flowbus-{self.actor_name}",
                                                    stuck_after=self.stuck_after)
                todo = [s for s in self.specs if s.get("name") not in self._hosted]
                await self._open(todo)
                self._started = True
        return await self.ping()

    async def _open(self, raws: list[dict[str, Any]]) -> None:
        if not raws:
            return
        specs = [msgspec.convert(raw, SessionConfig) for raw in raws]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._open_many_sync, specs)

    def _open_many_sync(self, specs: list[SessionConfig]) -> None:
        """Register every source in one round, read one snapshot, start sessions concurrently."""
        assert self._publisher is not None and self._scheduler is not None
        publisher = self._publisher
        sessions = [session_for(spec) for spec in specs]
        grants = self._publisher.open_sources([(spec.name, s.backend, self.grants.get(spec.name))
                                               for spec, s in zip(specs, sessions, strict=True)])
        refusals = self._publisher.refusals()
        known = self._known_many([(spec.name, s.backend) for spec, s in zip(specs, sessions, strict=True)])
        errors: list[tuple[str, BaseException]] = []

        def open_one(spec: SessionConfig, session: BackendSession) -> None:
            states, previous_address = known.get(spec.name, ({}, None))
            hosted = _Hosted(spec, session, publisher)
            if spec.name not in grants:
                why = refusals.get(spec.name)
                errors.append((spec.name, SourceRefused(f"session {spec.name!r}: {why}") if why
                               else Fenced(f"source {spec.name!r}: a newer incarnation owns it")))
                return
            epoch, next_seq = grants[spec.name]
            log.info("session.opening", session_id=spec.name, epoch=epoch, next_seq=next_seq, known=len(states))
            try:
                session.start(hosted.emit, states, previous_address=previous_address)
            except Exception as exc:  # noqa: BLE001 - reported after the others are open
                errors.append((spec.name, exc))
                publisher.close_source(spec.name)
                return
            self._hosted[spec.name] = hosted
            self._schedule(hosted)

        width = min(self.open_concurrency, len(specs))
        if width <= 1:
            for spec, session in zip(specs, sessions, strict=True):
                open_one(spec, session)
        else:
            with ThreadPoolExecutor(max_workers=width, thread_name_prefix=f"open-{self.actor_name}") as ex:
                list(ex.map(open_one, specs, sessions))
        self._publisher.flush()
        if errors:
            name, exc = errors[0]
            log.error("session.open.failed", failed=[n for n, _ in errors], first=name, error=str(exc))
            raise exc

    def _schedule(self, hosted: _Hosted) -> None:
        assert self._scheduler is not None
        hosted.on_fenced = self._on_fenced
        self._scheduler.add(hosted.spec.name, hosted.poll_once)

    def _on_fenced(self, hosted: _Hosted) -> None:
        """A newer incarnation of this session runs elsewhere: drop ours. Its polls stop and its
        backend connection is let go (the adapter's ``release()`` when it has one), but neither
        ``stop()`` nor ``kill()`` runs: they would end backend work the new incarnation adopted."""
        name = hosted.spec.name
        if self._hosted.get(name) is hosted:
            del self._hosted[name]
            self.specs = [s for s in self.specs if s.get("name") != name]
        log.warning("session.fenced", session_id=name, actor=self.actor_name)

        def release() -> None:  # off the poll thread: remove() waits for the poll in flight
            if self._scheduler is not None:
                self._scheduler.remove(name, timeout=10)
            release_fn = getattr(hosted.session, "release", None)
            try:
                if callable(release_fn):
                    release_fn()
            except Exception as exc:  # noqa: BLE001 - the session is gone either way
                log.error("session.release.failed", session_id=name, error=str(exc))
            # no close_source(): unregistering under the old epoch would tell the broker the
            # source is gone while its new incarnation publishes

        self._pool.submit(release)

    def _known_many(self, sources: list[tuple[str, str]]) -> dict[str, tuple[dict[str, StateChanged], str | None]]:
        """What the journal's snapshot says about each source (one request for all of them):
        states, and the last address."""
        import zmq

        req = Requester(zmq.Context.instance(), self.broker_address, self.curve, timeout=max(5.0, len(sources) / 50))
        try:
            payloads = req.call("snapshot", prefixes=[f"{backend}/{source}/" for source, backend in sources])["events"]
        finally:
            req.close()
        out: dict[str, tuple[dict[str, StateChanged], str | None]] = {name: ({}, None) for name, _ in sources}
        for ev in (decode(p) for p in payloads):
            if ev.source not in out:
                continue
            states, address = out[ev.source]
            if isinstance(ev, StateChanged):
                states[ev.key] = ev
            elif isinstance(ev, Connected) and address is None:
                out[ev.source] = (states, ev.address or None)
        return out

    def _known(self, source: str, backend: str) -> tuple[dict[str, StateChanged], str | None]:
        """What the journal's snapshot says about one source: states, and the last address."""
        return self._known_many([(source, backend)])[source]

    async def add_session(self, spec: dict[str, Any], grant: list[Any] | None = None) -> dict[str, Any]:
        await self.start()
        name = spec.get("name")
        if name in self._hosted:
            raise FlowbusError(f"session {name!r} is already hosted by {self.actor_name}")
        if grant is not None:
            self.grants[str(name)] = grant
        self.specs.append(spec)
        await self._open([spec])
        return await self.ping()

    async def call(self, session: str, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one backend operation; returns after the events it caused are journaled."""
        await self.start()
        if session in self._handing:
            raise BackendUnavailable(f"session {session!r} is being handed over to another actor of its group; "
                                     f"retry (the supervisor routes it to its new actor)")
        hosted = self._hosted.get(session)
        if hosted is None:
            raise UnknownSession(session)
        loop = asyncio.get_running_loop()

        def run() -> Any:
            result = hosted.session.call(operation, *args, **kwargs)
            assert self._publisher is not None
            self._publisher.flush(source=session)
            return result

        self._inflight[session] = self._inflight.get(session, 0) + 1
        try:
            return await loop.run_in_executor(self._pool, run)
        finally:
            self._inflight[session] -= 1
            if not self._inflight[session]:
                del self._inflight[session]
                async with self._cond():
                    self._cond().notify_all()

    def _cond(self) -> asyncio.Condition:
        if self._idle is None:
            self._idle = asyncio.Condition()
        return self._idle

    async def hand_over(self, session: str, wait: float = 60.0) -> dict[str, Any]:
        """Let go of ``session`` for another actor (rebalancing): new commands for it are refused
        (``BackendUnavailable``), the ones in flight finish (at most ``wait`` s, else
        ``BackendUnavailable`` and the session stays here), its polls stop (the one in flight
        finishes), what it published is flushed, its backend connection is released (its work
        runs on) and its source unregistered. The next incarnation opens it elsewhere and resyncs."""
        hosted = self._hosted.get(session)
        if hosted is None:
            raise UnknownSession(session)
        if session in self._handing:
            raise BackendUnavailable(f"session {session!r} is already being handed over")
        self._handing.add(session)
        try:
            async with self._cond():
                try:
                    await asyncio.wait_for(self._cond().wait_for(lambda: not self._inflight.get(session)), wait)
                except TimeoutError as exc:
                    raise BackendUnavailable(f"session {session!r}: a command still runs after {wait:g} s; "
                                             f"not handed over") from exc
            del self._hosted[session]
            self.specs = [s for s in self.specs if s.get("name") != session]
            await asyncio.get_running_loop().run_in_executor(self._pool, self._let_go, hosted, wait)
        finally:
            self._handing.discard(session)
        log.info("session.handed_over", session_id=session, actor=self.actor_name)
        return await self.ping()

    def _let_go(self, hosted: _Hosted, timeout: float) -> None:
        name = hosted.spec.name
        if self._scheduler is not None and not self._scheduler.remove(name, timeout=timeout):
            log.warning("session.hand_over.poll_in_flight", session_id=name)
        if self._publisher is not None:
            try:
                self._publisher.flush(min(timeout, 10.0), source=name)
            except FlowbusError as exc:
                log.warning("session.hand_over.flush_failed", session_id=name, error=str(exc))
        release_fn = getattr(hosted.session, "release", None)
        try:
            if callable(release_fn):
                release_fn()
            else:
                hosted.session.kill()
        except Exception as exc:  # noqa: BLE001 - the session goes either way
            log.error("session.release.failed", session_id=name, error=str(exc))
        if self._publisher is not None:
            self._publisher.close_source(name)

    async def reset(self, specs: list[dict[str, Any]], grants: dict[str, list[Any]] | None = None) -> None:
        """Replace the sessions the next ``start()`` opens (after Ray restarted this actor, its
        constructor's sessions may belong to other actors now). Only before ``start()``."""
        async with self._start_lock:
            if self._started:
                raise FlowbusError(f"actor {self.actor_name}: reset after start")
            self.specs = list(specs)
            self.grants = dict(grants or {})

    async def bound(self, session: str, operation: str, args: list[Any], kwargs: dict[str, Any]) -> float | None:
        """The operation's own time bound (see ``SessionBase.bound``), or None."""
        hosted = self._hosted.get(session)
        if hosted is None:
            raise UnknownSession(session)
        bound = getattr(hosted.session, "bound", None)
        return bound(operation, args, kwargs) if bound is not None else None

    async def operations(self, session: str) -> list[str]:
        await self.start()
        hosted = self._hosted.get(session)
        if hosted is None:
            raise UnknownSession(session)
        return list(hosted.session.operations())

    async def ping(self) -> dict[str, Any]:
        pub, sched = self._publisher, self._scheduler
        return {"actor": self.actor_name, "pid": os.getpid(), "started": self._started,
                "sessions": sorted(self._hosted), "bus_connected": bool(pub and pub.connected()),
                "publisher": dict(pub.stats) if pub else {},
                "stuck": self._stuck(),
                "scheduler": sched.info() if sched else {},
                # per session: retain-hours/-count, how many finished resources are held, forgotten
                "retention": {n: r.limits() for n, h in self._hosted.items()
                              if (r := getattr(h.session, "retention", None)) is not None}}

    def _stuck(self) -> dict[str, float]:
        """Polls in flight for longer than ``stuck_after``, and sessions whose own liveness probe
        finds their backend not answering (``stuck_for()``, e.g. ecFlow's), in seconds by name."""
        out = self._scheduler.stuck() if self._scheduler is not None else {}
        for name, hosted in list(self._hosted.items()):
            stuck_for = getattr(hosted.session, "stuck_for", None)
            since = stuck_for() if stuck_for is not None else None
            if since is not None:
                out[name] = max(out.get(name, 0.0), round(since, 3))
        return out

    async def remove_session(self, session: str) -> None:
        hosted = self._hosted.pop(session, None)
        if hosted is None:
            raise UnknownSession(session)
        self.specs = [s for s in self.specs if s.get("name") != session]
        await asyncio.get_running_loop().run_in_executor(self._pool, self._stop_one, hosted)

    def _stop_one(self, hosted: _Hosted) -> None:
        if self._scheduler is not None and not self._scheduler.remove(hosted.spec.name, timeout=10):
            log.warning("session.stop.poll_in_flight", session_id=hosted.spec.name)
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
        if self._scheduler is not None:
            await loop.run_in_executor(self._pool, self._scheduler.close)
            self._scheduler = None
        if self._publisher is not None:
            await loop.run_in_executor(self._pool, self._publisher.close, 2.0)
            self._publisher = None
        self._started = False

    def kill(self) -> None:
        """Best effort, immediate; never raises."""
        sched = self._scheduler
        self._scheduler = None
        if sched is not None:
            try:
                sched.close(timeout=0.5)
            except Exception as exc:  # noqa: BLE001 - kill never raises: logged, the sessions go next
                log.error("scheduler.close.failed", error=str(exc))
        for hosted in list(self._hosted.values()):
            try:
                hosted.session.kill()
            except Exception as exc:  # noqa: BLE001 - kill never raises: logged, the others go on
                log.error("session.kill.failed", session_id=hosted.spec.name, error=str(exc))
        self._hosted.clear()


BackendActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)(  # type: ignore[call-overload]  # Ray's stubs lack actor options
    BackendActorImpl)
