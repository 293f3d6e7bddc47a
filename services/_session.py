"""What every backend session shares, written once: :class:`SessionBase`.

A session is a small state machine (:class:`Phase`)::

    NEW --start--> UP <--reconnect-- DOWN --give up--> DEAD
                    \\-----lost------->/
    any --stop/release/kill--> CLOSED

The base owns the phase, the lock, emitting events, the poll skeleton (observe while UP; while
DOWN, reconnect when the backoff allows), losing the backend (``Disconnected`` at once),
reconnecting (``RecoveryAttempted``, ``Connected``, the resync diff, ``Resynced``), giving up
(``RecoveryGaveUp``), the three ways to end (``stop`` publishes ``Disconnected``, ``release``
publishes nothing, ``kill`` never raises), and operations (:class:`Operations`).

An adapter supplies only what is specific to its backend, as hooks:

- :meth:`SessionBase._open` reaches the backend (starting it when the session owns it) and
  returns a :class:`Opened`: where it is, what it is, and the diff of the backend's truth against
  what the session last published (``observed`` given);
- :meth:`SessionBase._observe` looks once while UP and publishes what changed; it raises
  ``BackendUnavailable``/``BackendTimeout`` when the backend is lost;
- :meth:`SessionBase._lost` drops the connection after a loss (default: :meth:`_drop`);
- :meth:`SessionBase._close`, :meth:`SessionBase._let_go`, :meth:`SessionBase._kill` end it.

A backend that is unreachable at :meth:`SessionBase.start` does not fail the start: the session
opens DOWN, publishes ``Disconnected`` and keeps retrying like after a loss, so one dead server
never stops the sessions beside it. Only a request the backend can never accept (a bad config:
``BackendRejected``) fails the start.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog

from flowbus.schemas import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Connected,
    Disconnected,
    Event,
    Forgotten,
    Observed,
    RecoveryAttempted,
    RecoveryGaveUp,
    Resynced,
)

from ._base import Backoff, Emit
from ._ops import Operations
from ._retention import Retention, Retired

#: how long an idle session (not UP, not reconnecting) waits before its next poll
IDLE_S = 0.5
#: the longest wait between two reconnect attempts, unless the first one is longer
BACKOFF_CAP_S = 30.0
#: how long kill() waits for a poll or call in progress before it goes ahead anyway
KILL_WAIT_S = 1.0


class Phase(enum.Enum):
    NEW = "new"
    UP = "up"
    DOWN = "down"  # lost (or never reached): reconnecting with backoff
    DEAD = "dead"  # gave up reconnecting
    CLOSED = "closed"


@dataclass(frozen=True)
class Opened:
    """What :meth:`SessionBase._open` found: published as ``Connected``, the diff, ``Resynced``."""

    address: str
    detail: str = ""
    events: Sequence[Event] = ()
    resources: int = 0
    #: published right after ``Connected``, before the diff (e.g. a recovery the open did)
    announce: Sequence[Event] = field(default_factory=tuple)


class SessionBase:
    """The skeleton of a backend session (implements ``BackendSession`` and ``Releasable``).

    Subclasses set :attr:`backend` and :attr:`ops`, call ``super().__init__(config)``, and
    implement the hooks. Every hook runs with :attr:`_lock` held; hooks publish with
    :meth:`_publish` and build events with :meth:`_ev`.
    """

    backend: str
    #: the operations :meth:`call` runs (a per-backend :class:`Operations` table)
    ops: ClassVar[Operations[Any]]
    #: whether the backend is asked to forget what the session forgets when the config leaves
    #: ``forget-in-backend`` unset (see :meth:`_forget`)
    forget_in_backend_default: ClassVar[bool] = False

    def __init__(self, config: Any, *, backoff_first: float = 1.0, reconnect_attempts: int = 0,
                 start_timeout: float = 0.0) -> None:
        self.config = config
        self.name: str = config.name
        self._log = structlog.get_logger(f"flowbus.{self.backend}").bind(backend=self.backend,
                                                                           session_id=self.name)
        self._lock = threading.RLock()
        self._phase = Phase.NEW
        self._emit: Emit | None = None
        self._attempt = 0
        self._down_reason = ""
        self._reconnect_attempts = reconnect_attempts
        self._start_timeout = start_timeout
        self._backoff = Backoff(first=backoff_first, cap=max(BACKOFF_CAP_S, backoff_first))
        self._previous_address: str | None = None
        #: set (before any ending hook runs) by stop/release/kill; other threads read it lock-free
        self._closing = False
        #: finished resources, forgotten after the config's retention (services/_retention.py)
        self.retention = Retention.of(config)

    # -- introspection -----------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return self._phase.value

    @property
    def address(self) -> str:
        """Where the backend is (for ``Connected`` and logs); adapters override."""
        return ""

    def operations(self) -> list[str]:
        return self.ops.names()

    # -- the BackendSession interface ----------------------------------------------------------------

    def start(self, emit: Emit, known: Mapping[str, Event], *, previous_address: str | None = None) -> None:
        """Reach the backend, publish ``Connected``, the ``resync`` diff to ``known`` and
        ``Resynced``. Tries for the start timeout; a backend still unreachable then leaves the
        session DOWN (``Disconnected`` published, reconnects on later polls). Raises only
        ``BackendRejected`` (a config the backend can never accept, or a second start)."""
        with self._lock:
            if self._phase is not Phase.NEW:
                raise BackendRejected(f"start: session {self.name!r} was already started")
            self._emit = emit
            self._previous_address = previous_address
            self.retention.seed(known)
            self._seed(known)
            deadline = time.monotonic() + max(0.0, self._start_timeout)
            while True:
                try:
                    self._connect(Observed.RESYNC)
                    return
                except (BackendUnavailable, BackendTimeout) as exc:
                    if self._stopped():
                        return  # stopped while opening (a hook waited with the lock released)
                    if time.monotonic() >= deadline:
                        self._log.warning("session.start.unreachable", error=str(exc), address=self.address)
                        if self._will_retry():
                            self._go_down(f"{exc}", will_retry=True)
                        else:
                            self._go_dead(f"{exc}")
                        return
                except BackendError as exc:
                    if self._stopped():
                        return
                    self._log.error("session.start.failed", error=str(exc))
                    self._drop()
                    self._emit = None
                    self._phase = Phase.CLOSED
                    raise BackendRejected(f"session {self.name!r}: {exc}") from exc
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def poll(self) -> float:
        """Observe once while UP; while DOWN, reconnect when the backoff allows."""
        with self._lock:
            if self._phase is Phase.UP:
                try:
                    self._observe()
                except (BackendUnavailable, BackendTimeout) as exc:
                    self._on_lost(str(exc))
                else:
                    self._retire()
            elif self._phase is Phase.DOWN and self._backoff.ready():
                self._reconnect()
            return self._next_poll()

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one operation by name (see :attr:`ops`); results are plain, msgpack-able data.
        Every error names the session and the operation: ``session 'x': <operation>: <why>``."""
        try:
            return self.ops.run(self, operation, args, kwargs)
        except BackendError as exc:
            if f"session {self.name!r}" not in str(exc):
                exc.args = (f"session {self.name!r}: {exc}", *exc.args[1:])
            raise

    def lost(self, reason: str) -> None:
        """The backend was lost, as seen by a thread of the adapter's own (a push-driven
        backend's reader): handled as a failed observe. Ignored unless the session is UP."""
        with self._lock:
            if self._phase is Phase.UP:
                self._on_lost(reason)

    def bound(self, operation: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> float | None:
        """The operation's own time bound for these arguments (its ``timeout``), if it has one:
        a command that runs it waits at least that long."""
        return self.ops.bound(operation, list(args), kwargs)

    def stop(self) -> None:
        """Graceful: end the backend session (see :meth:`_close`), then ``Disconnected``."""
        self._closing = True
        with self._lock:
            if self._phase is Phase.CLOSED:
                return
            was_up = self._phase is Phase.UP
            try:
                self._close(was_up)
            except Exception as exc:  # noqa: BLE001  (stop ends the session whatever the backend says)
                self._log.warning("session.stop.failed", error=repr(exc))
            self._phase = Phase.CLOSED
            if was_up:
                self._publish([self._ev(Disconnected, reason="stopped", will_retry=False)])
            self._emit = None
        self._ended()
        self._log.info("session.stopped")

    def release(self) -> None:
        """Let go for a newer incarnation elsewhere: no request to the backend, nothing
        published; the backend's work runs on for the new incarnation to adopt. Idempotent."""
        self._closing = True
        with self._lock:
            if self._phase is Phase.CLOSED:
                return
            self._emit = None  # first: nothing below can publish
            try:
                self._let_go()
            except Exception as exc:  # noqa: BLE001  (release must not fail the fencing host)
                self._log.warning("session.release.failed", error=repr(exc))
            self._phase = Phase.CLOSED
        self._ended()
        self._log.info("session.released", address=self.address)

    def kill(self) -> None:
        """Immediate and best effort (waits at most :data:`KILL_WAIT_S` for a running poll or
        call); never raises."""
        self._closing = True
        got = self._lock.acquire(timeout=KILL_WAIT_S)
        try:
            self._emit = None
            self._kill()
        except Exception as exc:  # noqa: BLE001  (kill never raises, by contract)
            self._log.warning("session.kill.failed", error=repr(exc))
        finally:
            self._phase = Phase.CLOSED
            if got:
                self._lock.release()

    # -- hooks ---------------------------------------------------------------------------------------

    def _seed(self, known: Mapping[str, Event]) -> None:
        """Take the last states the bus holds for this source (the base of the first diff)."""

    def _open(self, observed: Observed) -> Opened:
        """Reach the backend and compare it with what was published. Raise
        ``BackendUnavailable``/``BackendTimeout`` when it cannot be reached (retried),
        ``BackendRejected`` when it never can be."""
        raise NotImplementedError

    def _opened(self) -> None:
        """After ``Connected`` and the diff were published (e.g. resubmit lost work)."""

    def _observe(self) -> None:
        """One look while UP; publish what changed; raise ``BackendUnavailable`` when lost."""
        raise NotImplementedError

    def _drop(self) -> None:
        """Forget the connection to the backend (after a loss or a failed open)."""

    def _lost(self, reason: str) -> None:
        """The backend was lost: clean up before reconnecting (default :meth:`_drop`)."""
        self._drop()

    def _close(self, was_up: bool) -> None:
        """``stop``: end gracefully what the session started (default :meth:`_drop`)."""
        self._drop()

    def _let_go(self) -> None:
        """``release``: end this process's connections and threads only (default :meth:`_drop`)."""
        self._drop()

    def _kill(self) -> None:
        """``kill``: end everything at once (default :meth:`_drop`)."""
        self._drop()

    def _ended(self) -> None:
        """After ``stop``/``release``, with the lock released (e.g. join threads that need it)."""

    def _forget(self, retired: Sequence[Retired], in_backend: bool) -> None:
        """Retention passed for these finished resources: drop them from the adapter's memory
        and, when ``in_backend``, ask the backend to forget them too (the session is UP). Raise
        a ``BackendError`` when the backend refused: the session still forgets them."""

    def _will_retry(self) -> bool:
        """Whether a lost (or never reached) backend is retried; ``False`` makes a loss final."""
        return True

    def _recovery(self) -> tuple[str, str]:
        """The ``action`` and ``detail`` of a reconnect's ``RecoveryAttempted``."""
        return "reconnect", self.address

    def _gave_up(self) -> None:
        """The session is DEAD (gave up, or a loss without retry): e.g. report lost work."""

    def _poll_interval(self) -> float:
        """Seconds between two looks while UP."""
        return float(getattr(self.config, "poll_interval", IDLE_S))

    # -- shared machinery ------------------------------------------------------------------------------

    def _connect(self, observed: Observed, announce: Sequence[Event] = ()) -> None:
        opened = self._open(observed)
        if self._phase is Phase.CLOSED:  # stopped while a hook waited with the lock released
            self._drop()
            return
        self._phase = Phase.UP
        self._publish([*announce, self._ev(Connected, address=opened.address, detail=opened.detail),
                       *opened.announce])
        self._publish(list(opened.events))
        self._publish([self._ev(Resynced, changed=len(opened.events), resources=opened.resources)])
        self._opened()

    def _on_lost(self, reason: str) -> None:
        self._log.warning("session.lost", reason=reason, address=self.address)
        try:
            self._lost(reason)
        except Exception as exc:  # noqa: BLE001  (a loss is handled whatever cleaning up says)
            self._log.warning("session.lost.cleanup_failed", error=repr(exc))
        if self._will_retry():
            self._go_down(reason, will_retry=True)
        else:
            self._go_dead(reason)

    def _go_down(self, reason: str, *, will_retry: bool) -> None:
        self._publish([self._ev(Disconnected, reason=reason, will_retry=will_retry)])
        self._phase = Phase.DOWN
        self._down_reason = reason
        self._attempt = 0
        self._backoff.reset()
        self._backoff.next()

    def _go_dead(self, reason: str) -> None:
        """Lost for good without retrying (see :meth:`_will_retry`)."""
        self._publish([self._ev(Disconnected, reason=reason, will_retry=False),
                       self._ev(RecoveryGaveUp, attempts=0, reason=f"recovery disabled: {reason}")])
        self._down_reason = reason
        self._phase = Phase.DEAD
        self._gave_up()

    def _reconnect(self) -> None:
        """One attempt, published whether it works (``RecoveryAttempted`` before ``Connected``)
        or not (``RecoveryAttempted(ok=False)`` naming why); the last allowed one gives up."""
        self._attempt += 1
        attempt = self._attempt
        action, detail = self._recovery()
        announce = self._ev(RecoveryAttempted, action=action, attempt=attempt, reason=self._down_reason,
                            detail=detail)
        try:
            self._connect(Observed.RESYNC, (announce,))
        except BackendError as exc:
            self._drop()
            if self._phase is Phase.CLOSED:
                return
            self._log.info("session.reconnect.failed", action=action, attempt=attempt, error=str(exc))
            self._publish([self._ev(RecoveryAttempted, action=action, attempt=attempt, reason=self._down_reason,
                                    ok=False, detail=str(exc))])
            limit = self._reconnect_attempts
            if limit and attempt >= limit:
                self._give_up(attempt, str(exc))
            else:
                self._backoff.next()
            return
        self._log.info("session.reconnect.succeeded", action=action, attempt=attempt)
        self._backoff.reset()

    def _give_up(self, attempts: int, reason: str) -> None:
        self._log.error("session.gave_up", attempts=attempts, reason=reason)
        self._publish([self._ev(RecoveryGaveUp, attempts=attempts, reason=reason)])
        self._phase = Phase.DEAD
        self._gave_up()

    def _retire(self) -> None:
        """Forget the finished resources past retention (a batch per poll) and publish
        ``Forgotten`` for each."""
        retired = self.retention.due()
        if not retired:
            return
        setting = getattr(self.config, "forget_in_backend", None)
        in_backend = self.forget_in_backend_default if setting is None else bool(setting)
        try:
            self._forget(retired, in_backend)
        except BackendError as exc:
            self._log.warning("session.forget.backend_failed", keys=len(retired), error=str(exc))
            in_backend = False
        self._log.debug("session.forgot", keys=len(retired), in_backend=in_backend)
        self._publish([self._ev(Forgotten, key=r.key, last_state=r.state, last_native=r.native,
                                in_backend=in_backend) for r in retired])

    def _next_poll(self) -> float:
        if self._phase is Phase.UP:
            return self._poll_interval()
        if self._phase is Phase.DOWN:
            return max(0.01, min(self._poll_interval(), self._backoff.not_before - time.monotonic()))
        return IDLE_S

    def _stopped(self) -> bool:
        """Whether the session was ended (a hook that waits with the lock released may see it)."""
        return self._phase is Phase.CLOSED

    def _require_up(self, operation: str) -> None:
        """Raise ``BackendUnavailable`` naming the session when it is not UP."""
        if self._phase is Phase.UP:
            return
        if self._phase is Phase.DOWN:
            raise BackendUnavailable(f"{operation}: session {self.name!r} is disconnected "
                                     f"({self._down_reason}); reconnecting")
        if self._phase is Phase.DEAD:
            raise BackendUnavailable(f"{operation}: session {self.name!r} gave up reconnecting "
                                     f"({self._down_reason})")
        raise BackendUnavailable(f"{operation}: session {self.name!r} is {self._phase.value}")

    def _ev(self, cls: type[Any], **fields: Any) -> Any:
        return cls(source=self.name, backend=self.backend, **fields)

    def _publish(self, events: Sequence[Event]) -> None:
        emit = self._emit
        if emit is None:
            return
        note = self.retention.note
        for ev in events:
            note(ev)
            emit(ev)


__all__ = ["BACKOFF_CAP_S", "IDLE_S", "KILL_WAIT_S", "Opened", "Phase", "SessionBase"]
