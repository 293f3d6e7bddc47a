"""The ecFlow backend session: one running ``ecflow_server`` observed by polling.

Observation: each poll asks ``news_local()``; when there is news, ``sync_local()`` and only the
nodes in ``changed_node_paths`` are read (an empty list means the client got the whole
definition: the whole tree is diffed). Changes are published with ``observed=poll``; the diff
against ``known`` in :meth:`EcflowSession.start` and after every reconnect uses ``resync``.
Keys are absolute node paths; the server itself is ``/`` (see :mod:`._ecflow_tree`).

Events: ``StateChanged`` per node (``state`` normalised, ``native`` ecFlow's display state with
``suspended`` as SUSPENDED, ``try_no`` from ECF_TRYNO, the aborted reason in ``detail``; a node
that disappears goes UNKNOWN with ``native=""``), ``AttributeChanged`` per event/meter/label
(``kind`` "event"/"meter"/"label"). The server is the key ``/``: its RUNNING/HALTED/SHUTDOWN
state is a ``StateChanged`` (ACTIVE/SUSPENDED/SUSPENDED) and each suite an ``AttributeChanged``
with ``kind="suite"`` (True while loaded, False once deleted).

Liveness and recovery: a failed poll publishes ``Disconnected`` at once; reconnects follow with
backoff. A server restarted between two polls is found by its new ECF_PID (or, for a session
that called ``ch_register``, by the server refusing its handle). Every reconnect resets the
client, registers the handle again, restarts a HALTED server when ``restart-halted`` is set,
and publishes ``RecoveryAttempted``, ``Connected``, the ``resync`` diff and ``Resynced``.

The GIL: ``ecflow.Client`` holds it for a whole request, retry sleeps included, so the client
is built with one connection attempt and no retry period: a dead server costs well under a
millisecond per poll and never stalls the other sessions of the process. A server that accepts
but never answers holds it for ``request-timeout`` seconds (ecFlow's own default is 20 s).

Threads: :meth:`EcflowSession.poll` runs on one worker thread; :meth:`EcflowSession.call` may
come from any thread. One lock serialises every use of the client (its defs are mutated in place
by ``sync_local``) and of the session's bookkeeping.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import ecflow
import structlog

from flowbus.schemas import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Connected,
    Disconnected,
    EcflowSessionConfig,
    Event,
    Observed,
    RecoveryAttempted,
    RecoveryGaveUp,
    Resynced,
)

from ._base import Backoff, Emit, dispatch
from ._ecflow_ops import OPERATIONS, EcflowOperations, Phase, ecflow_errors
from ._ecflow_tree import Tree, read_full, read_paths, server_pid

_IDLE_S = 0.5
#: the client's constructor reads its settings from the environment: one construction at a time
_ENV_LOCK = threading.Lock()  # ECF_CONNECT_TIMEOUT and ECF_CUSTOM_PASSWD are read from os.environ
_HANDLE_GONE = "does not exist in server"


class EcflowSession(EcflowOperations):
    """A session with one ecFlow server (implements ``BackendSession``).

    Operations (:meth:`call`): ``load(text=None, *, path=None, force=False, check_only=False)``,
    ``replace(node_path, text=None, *, path=None, create_parents=True, force=False)``,
    ``delete(path, force=False)``, ``begin_suite(suite, force=False)``,
    ``begin_all_suites(force=False)``, ``suspend(path)``, ``resume(path)``,
    ``requeue(path, option="")``, ``force_state(path, state)``,
    ``force_state_recursive(path, state)``, ``force_event("/s/t:ev", "set"|"clear")``,
    ``run(path, force=False)``, ``kill(path)``, ``alter(path, alter_type, attr_type, name, value)``,
    ``query(query_type, path, attribute="") -> str``, ``check(path="") -> str``,
    ``get_file(path, file_type="script", max_lines=10000) -> str``, ``get_defs() -> str``,
    ``suites() -> list[str]``, ``checkpt(mode=None, interval=0, alarm=0)``,
    ``restore_from_checkpt()``, ``halt_server()``, ``restart_server()``, ``shutdown_server()``,
    ``terminate_server()``, ``ping()``, ``server_version() -> str``, ``stats()``,
    ``ch_register(auto_add, suites) -> int`` and ``client(method, *args, **kwargs)``, which
    reaches any other public ``ecflow.Client`` method (zombie_*, free_*_dep, order, edit_script_*,
    get_log, job_generation, ...) with its result as plain data (``Defs`` as text).

    Errors: ``BackendRejected`` (the server refused; its message is in the text),
    ``BackendUnavailable`` (no server, or it is being reconnected), ``BackendTimeout``,
    ``UnknownOperation``.
    """

    backend = "ecflow"

    def __init__(self, config: EcflowSessionConfig) -> None:
        self.config = config
        self.name = config.name
        self._log = structlog.get_logger("flowbus.ecflow").bind(backend="ecflow", session_id=config.name)
        self._lock = threading.RLock()
        self._tree = Tree(config.name)
        self._phase = Phase.NEW
        self._emit: Emit | None = None
        self._client: Any = None
        self._handle: tuple[bool, list[str]] | None = None
        self._attempt = 0
        self._down_reason = ""
        self._next_clear_log = 0.0
        self._server_pid = ""
        self._backoff = Backoff(first=config.reconnect_backoff, cap=max(30.0, config.reconnect_backoff))

    # -- introspection -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def phase(self) -> str:
        return self._phase.value

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, emit: Emit, known: Mapping[str, Event], *, previous_address: str | None = None) -> None:
        """Reach the server, publish ``Connected`` and the ``resync`` differences to ``known``.

        ``previous_address`` is ignored: the session never starts a server, it always talks to
        ``host:port``. Tries for up to ``config.timeout`` seconds; raises ``BackendUnavailable``
        (with ecFlow's message) when the server cannot be reached, ``BackendRejected`` for a
        session that was already started.
        """
        with self._lock:
            if self._phase is not Phase.NEW:
                raise BackendRejected(f"start: session {self.name!r} was already started")
            self._emit = emit
            self._tree.seed(known)
            self._client = self._make_client()
            deadline = time.monotonic() + max(0.0, self.config.timeout)
            while True:
                try:
                    self._connect(Observed.RESYNC)
                    return
                except (BackendUnavailable, BackendTimeout) as exc:
                    if time.monotonic() >= deadline:
                        self._log.error("ecflow.session.start_failed", error=str(exc))
                        self._client = None
                        self._emit = None
                        raise
                except BackendError as exc:
                    self._log.error("ecflow.session.start_failed", error=str(exc))
                    self._client = None
                    self._emit = None
                    raise
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))  # releases the GIL

    def poll(self) -> float:
        """Observe once; when the server is lost, reconnect when the backoff allows."""
        with self._lock:
            if self._phase is Phase.UP:
                self._poll_up()
            elif self._phase is Phase.DOWN and self._backoff.ready():
                self._reconnect()
            if self._phase is Phase.UP:
                return self.config.poll_interval
            if self._phase is Phase.DOWN:
                return max(0.01, min(self.config.poll_interval, self._backoff.not_before - time.monotonic()))
            return _IDLE_S

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one operation (see the class docstring); results are plain, picklable data."""
        return dispatch(self, OPERATIONS, operation, *args, **kwargs)

    def operations(self) -> list[str]:
        return sorted(OPERATIONS)

    def stop(self) -> None:
        """Publish ``Disconnected`` and drop the client. The server (not ours) keeps running."""
        with self._lock:
            if self._phase is Phase.CLOSED:
                return
            was_up = self._phase is Phase.UP
            if self._client is not None and self._handle is not None and was_up:
                try:
                    with ecflow_errors("ch_drop"):
                        self._client.ch_drop()
                except BackendError as exc:
                    self._log.info("ecflow.handle.drop_failed", error=str(exc))
            self._client = None
            self._phase = Phase.CLOSED
            if was_up:
                self._publish([self._ev(Disconnected, reason="stopped", will_retry=False)])
        self._log.info("ecflow.session.stopped")

    def release(self) -> None:
        """Let go of the server for a newer incarnation: drop the client (and with it the change
        handle, which is left registered: ``ch_drop`` would be a request to a server this process
        may no longer reach) without publishing ``Disconnected`` and without any request to the
        server. The server and its suites run on; the new session on ``host:port`` resyncs."""
        with self._lock:
            if self._phase is Phase.CLOSED:
                return
            self._client = None
            self._emit = None
            self._phase = Phase.CLOSED
        self._log.info("ecflow.session.released", address=self.address)

    def kill(self) -> None:
        """Immediate: drop the client without telling the server; never raises."""
        got = self._lock.acquire(timeout=1.0)
        try:
            self._client = None
            self._phase = Phase.CLOSED
        except Exception as exc:  # noqa: BLE001  (kill never raises, by contract)
            self._log.warning("ecflow.kill.failed", error=repr(exc))
        finally:
            if got:
                self._lock.release()

    # -- connecting --------------------------------------------------------------------------------

    def _make_client(self) -> Any:
        cfg = self.config
        # the client's constructor reads these from the environment (there is no setter)
        env = {"ECF_CONNECT_TIMEOUT": str(max(1, int(cfg.request_timeout)))}
        if cfg.password_file:
            env["ECF_CUSTOM_PASSWD"] = cfg.password_file
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                client = ecflow.Client(cfg.host, str(cfg.port))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        # one attempt, no sleep between attempts: the client holds the GIL while it retries
        client.set_connection_attempts(1)
        client.set_retry_connection_period(0)
        if cfg.user:
            client.set_user_name(cfg.user)
        if cfg.ssl:
            client.enable_ssl()
        return client

    def _connect(self, observed: Observed, announce: tuple[Event, ...] = ()) -> None:
        """Ping, restart a HALTED server when configured, re-register the handle, full sync,
        then ``Connected``, the diff, ``Resynced``."""
        client = self._client
        with ecflow_errors("connect"):
            client.ping()
            client.reset()  # drops a handle the server may no longer know; next sync is full
            if self._handle is not None:
                client.ch_register(*self._handle)
            client.sync_local()
            defs = client.get_defs()
            if self.config.restart_halted and defs is not None and str(defs.get_server_state()) == "HALTED":
                self._log.info("ecflow.server.restarted", reason="found HALTED")
                client.restart_server()
                client.sync_local()
                defs = client.get_defs()
            snap = read_full(defs)
            version = str(client.server_version())
            self._server_pid = server_pid(defs)
        self._phase = Phase.UP
        self._publish([*announce, self._ev(Connected, address=self.address, detail=f"ecflow {version}")])
        events = self._tree.diff(snap, observed, "not known to the ecFlow server")
        self._publish(events)
        self._publish([self._ev(Resynced, changed=len(events), resources=len(snap.nodes))])
        self._next_clear_log = time.monotonic() + self.config.clear_log_interval

    # -- observing ---------------------------------------------------------------------------------

    def _poll_up(self) -> None:
        client = self._client
        try:
            with ecflow_errors("poll"):
                if client.news_local():
                    self._sync(client)
                if self.config.clear_log_interval > 0 and time.monotonic() >= self._next_clear_log:
                    client.clear_log()
                    self._next_clear_log = time.monotonic() + self.config.clear_log_interval
        except (BackendUnavailable, BackendTimeout) as exc:
            self._on_lost(str(exc))
        except BackendError as exc:
            if _HANDLE_GONE in str(exc) and self._handle is not None:
                try:
                    with ecflow_errors("poll"):
                        self._restarted(f"client handle unknown to the server: {exc}", "ch_register")
                except (BackendUnavailable, BackendTimeout) as again:
                    self._on_lost(str(again))
                except BackendError as again:
                    self._log.warning("ecflow.handle.register_failed", error=str(again))
            else:
                self._log.warning("ecflow.poll.failed", error=str(exc))

    def _sync(self, client: Any) -> None:
        client.sync_local()
        paths = list(client.changed_node_paths)
        defs = client.get_defs()
        if not paths:  # a full sync: a server restarted between two polls shows up only here
            pid = server_pid(defs)
            if pid and self._server_pid and pid != self._server_pid:
                self._restarted(f"server restarted between polls (pid {self._server_pid} -> {pid})", "")
                return
        snap = read_full(defs) if not paths else read_paths(defs, paths)
        self._publish(self._tree.diff(snap, Observed.POLL))

    def _refresh(self, client: Any) -> None:
        self._publish(self._tree.diff(read_full(client.get_defs()), Observed.POLL))

    def _restarted(self, reason: str, action: str) -> None:
        """The server restarted unseen (a new pid, or our handle is unknown to it): report the
        loss, then reconnect at once (handle re-registered, restart policy, resync diff)."""
        self._log.warning("ecflow.server.restarted_unseen", reason=reason)
        self._publish([self._ev(Disconnected, reason=reason, will_retry=True)])
        self._connect(Observed.RESYNC, (self._ev(RecoveryAttempted, action=action or "reconnect", reason=reason),))

    # -- failure and recovery ----------------------------------------------------------------------

    def _on_lost(self, reason: str) -> None:
        will_retry = True
        self._log.warning("ecflow.server.lost", reason=reason, address=self.address)
        self._publish([self._ev(Disconnected, reason=reason, will_retry=will_retry)])
        self._phase = Phase.DOWN
        self._down_reason = reason
        self._attempt = 0
        self._backoff.reset()
        self._backoff.next()

    def _reconnect(self) -> None:
        self._attempt += 1
        attempt = self._attempt
        announce = self._ev(RecoveryAttempted, action="reconnect", attempt=attempt, reason=self._down_reason,
                            detail=self.address)
        try:
            self._connect(Observed.RESYNC, (announce,))
        except BackendError as exc:
            self._log.info("ecflow.reconnect.failed", attempt=attempt, error=str(exc))
            limit = self.config.reconnect_attempts
            if limit and attempt >= limit:
                self._publish([self._ev(RecoveryAttempted, action="reconnect", attempt=attempt,
                                        reason=self._down_reason, ok=False, detail=str(exc))])
                self._publish([self._ev(RecoveryGaveUp, attempts=attempt, reason=str(exc))])
                self._phase = Phase.DEAD
            else:
                self._backoff.next()
            return
        self._log.info("ecflow.reconnect.succeeded", attempt=attempt)
        self._backoff.reset()

    # -- helpers -----------------------------------------------------------------------------------

    def _ev(self, cls: type[Any], **fields: Any) -> Any:
        return cls(source=self.name, backend=self.backend, **fields)

    def _publish(self, events: list[Any]) -> None:
        if self._emit is None:
            return
        for ev in events:
            self._emit(ev)


__all__ = ["EcflowSession", "EcflowSessionConfig"]
