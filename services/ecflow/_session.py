"""The ecFlow backend session: one running ``ecflow_server`` observed by polling.

Observation: each poll asks the server whether it has news for the client (ecFlow's NEWS
request with the client's change handle and numbers, spoken on a socket of our own, see the GIL
below); when there is news, ``sync_local()`` and only the nodes in ``changed_node_paths`` are read
(an empty list means the client got the whole definition: the whole tree is diffed). Changes are
published with ``observed=poll``; the diff against ``known`` in :meth:`EcflowSession.start` and
after every reconnect uses ``resync``. Keys are absolute node paths; the server itself is ``/``
(see :mod:`._tree`).

Events: ``StateChanged`` per node (``state`` normalised, ``native`` ecFlow's display state with
``suspended`` as SUSPENDED, ``try_no`` from ECF_TRYNO, the aborted reason in ``detail``; a node
that disappears goes UNKNOWN with ``native=""``; a task's ``attrs["run"]`` is its job run token;
a task found in the same state on a new job run or try, e.g. aborted, requeued and aborted again
between two polls, is published again with ``attrs["rerun"] = True``, and so are its family and
suite when they went round with it, see :mod:`._reruns`), ``AttributeChanged`` per attribute
(``kind`` "event", "meter", "label", "variable", "repeat", "limit", "limit_max", "flag" (names
"late" and "zombie", True once set, False once cleared), "trigger"/"complete" (name
"expression", the text), "time"/"today"/"date"/"day"/"cron" (name the attribute's text, value
True), and those of :mod:`._attrs`); an attribute deleted is published with ``value=None``.
Zombies are ``AttributeChanged`` with ``kind="zombie"`` (:mod:`._zombies`), read from
``zombie_get`` when a poll has news and at least every ``ZOMBIE_READ_INTERVAL`` seconds.
The server is the key ``/``: its RUNNING/HALTED/SHUTDOWN
state is a ``StateChanged`` (ACTIVE/SUSPENDED/SUSPENDED) and each suite an ``AttributeChanged``
with ``kind="suite"`` (True while loaded, False once deleted).

Liveness and recovery: a failed poll publishes ``Disconnected`` at once; reconnects follow with
backoff. A server restarted between two polls is found by its new ECF_PID (or, for a session
that called ``ch_register``, by the server refusing its handle). Every reconnect resets the
client, registers the handle again, restarts a HALTED server when ``restart-halted`` is set,
and publishes ``RecoveryAttempted``, ``Connected``, the ``resync`` diff and ``Resynced``.

The GIL: ``ecflow.Client`` holds it for a whole request, retry sleeps included, so the client
is built with one connection attempt and no retry period: a dead server costs well under a
millisecond per poll. A server that accepts but never answers would hold it for
``request-timeout`` seconds, so the poll's own question, NEWS, is sent on a socket of the
session's own (:mod:`._news`, :mod:`._probe`; GIL released while it waits, ``probe-timeout``),
and so is a ping before every reconnect: a server that does not answer is ``stuck``
(:meth:`EcflowSession.stuck_for`; no client call is made to it, operations are refused) and
``Disconnected`` within request-timeout + probe-timeout + poll-interval. Only a poll with news
(or a zombie read, at least once a second) makes client calls; a server that freezes between our
NEWS and those calls still holds the GIL for ``request-timeout`` once (see
docs/backends/ecflow.md, Limits). With ``probe-timeout = 0`` or ``ssl`` the poll asks the
binding's ``news_local()`` instead.

Clean release: ``release()`` (and ``stop()``) ping the server and drop the change handle
(``ch_drop``) when it answers; a reconnect to the same server (same ECF_PID) drops the handle
the lost connection left there before registering a new one.

Threads: :meth:`EcflowSession.poll` runs on one worker thread; :meth:`EcflowSession.call` may
come from any thread. One lock serialises every use of the client (its defs are mutated in place
by ``sync_local``) and of the session's bookkeeping.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import ecflow

from flowbus.schemas import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    Disconnected,
    EcflowSessionConfig,
    Event,
    Observed,
    RecoveryAttempted,
)

from .._ops import Operations
from .._session import Opened, Phase, SessionBase
from ._errors import ecflow_errors
from ._logs import logs as _logs  # noqa: F401 - registers the logs operation on OPS
from ._news import Marks, News, news_of, news_request, read_marks, zombie_count, zombies_request
from ._ops import OPS
from ._probe import Liveness
from ._tree import Tree, read_full, read_paths, server_pid
from ._zombies import Zombies
from ._zombies import read as read_zombies

#: the client's constructor reads its settings from the environment: one construction at a time
_ENV_LOCK = threading.Lock()  # ECF_CONNECT_TIMEOUT and ECF_CUSTOM_PASSWD are read from os.environ
_HANDLE_GONE = "does not exist in server"
#: seconds between two reads of the zombie list when the server has no news
ZOMBIE_READ_INTERVAL = 1.0


def _login() -> str:
    """The user name ecFlow's client sends by default (the login name), for the liveness ping."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "flowbus"


class EcflowSession(SessionBase):
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
    ``terminate_server()``, ``ping()``, ``server_version() -> str``, ``stats() -> str``,
    ``ch_register(auto_add, suites) -> int``, ``ch_add(suites)``, ``ch_remove(suites)``,
    ``ch_auto_add(auto_add)``, ``ch_drop()``, ``ch_suites() -> str`` (the handle's suites are
    remembered and registered again after a server restart) and
    ``client(method, *args, **kwargs)``, which reaches the other public ``ecflow.Client`` methods
    (zombie_*, free_*_dep, order, edit_script_*, get_log, job_generation, ...) with their result
    as plain data (``Defs`` as text), except those that would change the session's client and
    the child commands (see docs/backends/ecflow.md).

    Errors: ``BackendRejected`` (the server refused; its message is in the text),
    ``BackendUnavailable`` (no server, or it is being reconnected), ``BackendTimeout``,
    ``UnknownOperation``.
    """

    backend = "ecflow"
    ops: ClassVar[Operations[Any]] = OPS

    def __init__(self, config: EcflowSessionConfig) -> None:
        super().__init__(config, backoff_first=config.reconnect_backoff,
                         reconnect_attempts=config.reconnect_attempts, start_timeout=config.timeout)
        self.config: EcflowSessionConfig = config
        self._tree = Tree(config.name)
        self._zombies = Zombies(config.name)
        self._next_zombie_read = 0.0
        self._client: Any = None
        self._handle: tuple[bool, list[str]] | None = None
        self._next_clear_log = 0.0
        self._server_pid = ""
        #: the change handle a lost connection left on the server, and that server's ECF_PID
        self._stale_handle: tuple[int, str] | None = None
        self._live = (Liveness(config.host, config.port, probe_timeout=config.probe_timeout,
                               request_timeout=float(config.request_timeout), user=config.user or _login(),
                               interval=float(config.poll_interval))
                      if config.probe_timeout > 0 and not config.ssl else None)
        #: the change handle and numbers of the client's last sync, sent in our own NEWS request
        #: (None: unknown, e.g. an operation used the client since; the next poll syncs)
        self._marks: Marks | None = None
        self._news_req: tuple[Marks | None, bytes] = (None, b"")
        self._zombies_req = b""

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def stuck_for(self) -> float | None:
        """Seconds the server has not answered the liveness probe, or None (read lock-free)."""
        return self._live.stuck_for() if self._live is not None else None

    # -- hooks ---------------------------------------------------------------------------------------

    def _seed(self, known: Mapping[str, Event]) -> None:
        self._tree.seed(known)
        self._zombies.seed(known)

    def _open(self, observed: Observed) -> Opened:
        """Ping, restart a HALTED server when configured, re-register the handle, full sync and
        diff. The server is never started here: the session always talks to ``host:port``."""
        if self._live is not None and not self._live.check():
            raise BackendTimeout(f"connect: ecFlow server {self.address} is stuck (no answer to a ping within "
                                 f"{self.config.probe_timeout:g} s)")
        if self._client is None:
            self._client = self._make_client()
        client = self._client
        with ecflow_errors("connect"):
            client.ping()
            client.reset()  # drops a handle the server may no longer know; next sync is full
            self._drop_stale(client)
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
            self._auto_added(snap.suites)
            version = str(client.server_version())
            self._server_pid = server_pid(defs)
            self._marks = self._read_marks(client)
        self._next_clear_log = time.monotonic() + self.config.clear_log_interval
        events = self._tree.diff(snap, observed, "not known to the ecFlow server")
        events += self._zombie_news(client, observed)
        return Opened(self.address, f"ecflow {version}", events, len(snap.nodes))

    def _observe(self) -> None:
        client = self._client
        try:
            news = self._news()
            if news is None:
                self._log.warning("ecflow.server.stuck", stuck_for=round(self.stuck_for() or 0.0, 3))
                return  # no client call to a stuck server: it would hold the GIL for request-timeout
            with ecflow_errors("poll"):
                if news:
                    self._sync(client)
                if self._client is client and (news or time.monotonic() >= self._next_zombie_read):
                    self._publish(self._zombie_news(client, Observed.POLL))
                if self.config.clear_log_interval > 0 and time.monotonic() >= self._next_clear_log:
                    client.clear_log()
                    self._next_clear_log = time.monotonic() + self.config.clear_log_interval
        except (BackendUnavailable, BackendTimeout, BackendProtocolError):
            raise  # lost, stuck past its deadline, or a reply that is not ecFlow's (an ErrorEvent)
        except BackendError as exc:
            if _HANDLE_GONE in str(exc) and self._handle is not None:
                try:
                    with ecflow_errors("poll"):
                        self._restarted(f"client handle unknown to the server: {exc}", "ch_register")
                except (BackendUnavailable, BackendTimeout):
                    raise
                except BackendError as again:
                    self._log.warning("ecflow.handle.register_failed", error=str(again))
            else:
                self._log.warning("ecflow.poll.failed", error=str(exc))

    def _news(self) -> bool | None:
        """Whether the server has news for the client: asked on a socket of our own (GIL released
        while it waits; :mod:`._news`), None while the server is stuck; through the binding's
        ``news_local()`` without the probe (``probe-timeout = 0``, or TLS). Marks not known (an
        operation used the client since its last sync) count as news: the sync reads them."""
        if self._live is None:
            with ecflow_errors("poll"):
                return bool(self._client.news_local())
        marks = self._marks
        if marks is None:
            return True if self._live.check() else None
        if self._news_req[0] != marks:  # built once per sync (the JSON encoder with indent is slow)
            self._news_req = (marks, news_request(self._live.user, self._live.client_host, marks))
        reply = self._live.ask(self._news_req[1], "news request")
        if reply is None:
            return None
        return news_of(reply, self.address) is not News.NO_NEWS

    def _poll_interval(self) -> float:
        """The poll interval, or less while a stuck server's verdict falls due sooner."""
        interval = float(self.config.poll_interval)
        return self._live.next_poll(interval) if self._live is not None else interval

    def _drop(self) -> None:
        client = self._client
        if client is not None and self._handle is not None and self._server_pid:
            with contextlib.suppress(Exception):  # the client is being forgotten whatever it says
                number = int(client.ch_handle())
                if number:
                    self._stale_handle = (number, self._server_pid)
        self._client = None
        self._marks = None

    def _let_go(self) -> None:
        """``release``: drop the change handle when the server answers a ping (a stuck or gone
        server is not asked), then the client; the server and its work run on."""
        client = self._client
        if client is not None and self._handle is not None and self._phase is Phase.UP:
            try:
                if self._live is None or self._live.check():
                    with ecflow_errors("ch_drop"):
                        client.ch_drop()
                        self._log.info("ecflow.handle.dropped", reason="released")
            except BackendError as exc:
                self._log.info("ecflow.handle.drop_failed", error=str(exc))
        self._client = None

    def _drop_stale(self, client: Any) -> None:
        """A reconnect to the same server (same ECF_PID) drops the handle the lost connection
        left registered there; a restarted server has no handles, and its numbers mean others'."""
        stale = self._stale_handle
        if stale is None:
            return
        number, pid = stale
        client.sync_local()
        self._stale_handle = None
        if server_pid(client.get_defs()) != pid:
            return
        try:
            client.ch_drop(number)
            self._log.info("ecflow.handle.dropped", handle=number, reason="left by a lost connection")
        except RuntimeError as exc:
            self._log.info("ecflow.handle.drop_failed", handle=number, error=" ".join(str(exc).split()))
        client.reset()

    def _close(self, was_up: bool) -> None:
        """Drop the change handle (when the server is reachable) and the client. The server (not
        ours) keeps running."""
        if self._client is not None and self._handle is not None and was_up:
            try:
                if self._live is not None and not self._live.check():
                    raise BackendTimeout(f"ch_drop: ecFlow server {self.address} is stuck")
                with ecflow_errors("ch_drop"):
                    self._client.ch_drop()
            except BackendError as exc:
                self._log.info("ecflow.handle.drop_failed", error=str(exc))
        self._client = None

    # -- helpers for the operations --------------------------------------------------------------------

    @contextlib.contextmanager
    def _using(self, operation: str) -> Iterator[Any]:
        """The client, under the lock, with ecFlow errors mapped at this edge."""
        with self._lock:
            self._require_up(operation)
            if self._live is not None and self._live.stuck_since is not None:
                raise BackendUnavailable(f"{operation}: ecFlow server {self.address} is stuck (no answer to a "
                                         f"ping for {self._live.stuck_for() or 0.0:.1f} s)")
            self._log.debug("ecflow.call.started", operation=operation)
            try:
                with ecflow_errors(operation):
                    yield self._client
            except BackendError as exc:
                self._marks = None
                self._log.warning("ecflow.call.failed", operation=operation, error=str(exc))
                raise
            self._marks = None  # the operation may have synced, reset or re-registered the client
            self._log.debug("ecflow.call.complete", operation=operation)

    def _refresh(self, client: Any) -> None:
        """The client's defs were replaced outside poll(): diff them now so nothing is skipped."""
        self._publish(self._tree.diff(read_full(client.get_defs()), Observed.POLL))

    # -- connecting and observing --------------------------------------------------------------------

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

    def _sync(self, client: Any) -> None:
        client.sync_local()
        paths = list(client.changed_node_paths)
        defs = client.get_defs()
        self._marks = self._read_marks(client)
        if not paths:  # a full sync: a server restarted between two polls shows up only here
            pid = server_pid(defs)
            if pid and self._server_pid and pid != self._server_pid:
                self._restarted(f"server restarted between polls (pid {self._server_pid} -> {pid})", "")
                return
        snap = read_full(defs) if not paths else read_paths(defs, paths, self._tree.children)
        self._auto_added(snap.suites)
        self._publish(self._tree.diff(snap, Observed.POLL))

    def _read_marks(self, client: Any) -> Marks | None:
        """The client's handle and change numbers for our NEWS; None without the session's own
        requests, or when they cannot be read here (then every poll pings and syncs, as it would
        through the binding: slower, nothing missed)."""
        if self._live is None:
            return None
        try:
            return read_marks(client)
        except (OSError, RuntimeError, ValueError) as exc:
            self._log.warning("ecflow.marks.unreadable", error=str(exc))
            return None

    def _zombie_news(self, client: Any, observed: Observed) -> list[Event]:
        """The zombies that appeared, changed action or left since the last read (:mod:`._zombies`),
        of the suites observed (a change handle leaves the others out). A refused ``zombie_get``
        (e.g. a white list without the right) is logged and publishes nothing: the poll goes on."""
        self._next_zombie_read = time.monotonic() + ZOMBIE_READ_INTERVAL
        try:
            if self._live is not None and not self._zombies.known:  # none known: ask GIL-free first
                if not self._zombies_req:
                    self._zombies_req = zombies_request(self._live.user, self._live.client_host)
                reply = self._live.ask(self._zombies_req, "zombie list")
                if reply is None or zombie_count(reply, self.address) == 0:
                    return []  # stuck (the next poll says so), or no zombie on the server
            with ecflow_errors("zombie_get"):
                zombies = read_zombies(client)
        except (BackendUnavailable, BackendTimeout, BackendProtocolError):
            raise
        except BackendError as exc:
            self._log.warning("ecflow.zombies.refused", error=str(exc))
            return []
        suites = self._tree.suites
        now = {k: v for k, v in zombies.items() if k[0].split("/")[1:2] and k[0].split("/")[1] in suites}
        return self._zombies.diff(now, observed)

    def _auto_added(self, suites: list[str]) -> None:
        """With ``auto_add``, suites the server added to the handle are remembered with it, so a
        restarted server gets them back (a new registration only auto-adds suites created later)."""
        if self._handle is not None and self._handle[0]:
            auto, names = self._handle
            self._handle = (auto, [*names, *(s for s in suites if s not in names)])

    def _restarted(self, reason: str, action: str) -> None:
        """The server restarted unseen (a new pid, or our handle is unknown to it): report the
        loss, then reconnect at once (handle re-registered, restart policy, resync diff)."""
        self._log.warning("ecflow.server.restarted_unseen", reason=reason)
        self._publish([self._ev(Disconnected, reason=reason, will_retry=True)])
        self._connect(Observed.RESYNC, (self._ev(RecoveryAttempted, action=action or "reconnect", reason=reason),))


__all__ = ["EcflowSession"]
