"""The DiFX guiServer session (spec: docs/protocols/guiserver.md).

One TCP connection; the version handshake (8 -> ... 18) before anything else, then always the
setup path (13), channelled mode (19), relay on/off (1) and the message selection (17). A reader
thread feeds the sans-I/O :class:`~.protocol.Connection` and turns what it returns into typed
events (:class:`~._events.Translator`): relayed DifxStatusMessage -> ``StateChanged`` +
``AttributeChanged(kind="progress")``, alerts/info/server texts/job output -> ``LogLine``, job-run
sub-packets -> ``StateChanged``.

Liveness: the reader is the one that notices a loss. A guiServer that dies or closes the
connection (EOF, reset) or sends garbage (a protocol error, also published as ``ErrorEvent``) is
``Disconnected`` at once: as soon as the reader gets the lock, which a poll or an operation holds
only while it is not waiting for the server. A host that vanishes without closing the connection
is found by TCP keepalive within about ``request-timeout`` + 6 s, or by the first send that fails;
a server that keeps the connection but sends nothing for 2 s gets a version request, and one that
does not answer it (or the status request of a job whose stream was lost) within
``request-timeout`` is taken as lost. The handshake resends its version request every 0.5 s
until answered: a real guiServer loses the first packet of about one connection in ten.

Recovery (:class:`~flowbus.services._session.SessionBase`): reconnects with backoff; every open
handshakes, re-applies the settings and asks GET_JOB_STATUS for every job whose stream was lost
(or that the journal knows as unfinished), so ``Connected`` is followed by what the ``.difxlog``
says (``observed=resync``) and ``Resynced``. Unreachable at ``start()``: the session opens
disconnected and keeps trying. Only a non-loopback host without ``allow-remote``, or a peer on the
port that does not speak guiServer, fails the start (``BackendRejected``).

Threads: the reader (one per connection), one per direct-mode sub-stream, and one per
``vex2difx(wait=False)`` run. :meth:`GuiserverSession.stop` and :meth:`GuiserverSession.release`
close every socket under the lock and join these threads once the lock is released.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from flowbus.schemas import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    ErrorEvent,
    Event,
    GuiserverSessionConfig,
    Observed,
)

from .._ops import Operations
from .._session import Opened, Phase
from . import _check as check
from . import (
    _monitor,  # noqa: F401 - registers the real-time monitor operations on OPS
    _ops_extra,  # noqa: F401 - registers file_list and the Mark5 operations on OPS
)
from ._events import JobTrack, Translator
from ._logs import logs as _logs  # noqa: F401 - registers the logs operation on OPS
from ._ops import OPS
from ._streams import SubStreams, _Pending
from .protocol import (
    ChannelOpened,
    Connection,
    ConnState,
    PacketId,
    ServerEvent,
    StreamItem,
    StreamKind,
    StreamPacket,
    VersionInfo,
    encode,
    encode_int,
    encode_string,
)

#: seconds stop()/release() wait for each of the session's threads once the sockets are closed
JOIN_S = 5.0
#: while UP: seconds between two polls, and between two status requests for jobs whose stream was lost
_POLL_S = 0.2
_RESYNC_S = 1.0
#: the longest gap between two status requests for a job whose .difxlog says nothing new
_RESYNC_MAX_S = 60.0
#: the handshake resends its version request this often until answered (a real guiServer loses the
#: first packet of about one connection in ten, docs/protocols/guiserver.md §2.3)
_RESEND_S = 0.5
#: while UP: after this long without a byte from the server, a version request probes it; no answer
#: within ``request-timeout`` is a loss (a frozen server keeps its TCP connection open)
_SILENCE_S = 2.0
#: a version request (the handshake's, or the probe's of a silent connection) unanswered for this
#: long names the server ``stuck`` (:meth:`GuiserverSession.stuck_for`, listed by the actor's ping)
_STUCK_S = 0.5
#: TCP keepalive probes (interval, count) after ``request-timeout`` seconds of silence
_KEEPALIVE = (2, 3)
_SAFE_SETUP = re.compile(r"/[A-Za-z0-9_./+@:=,%-]*")


class GuiserverSession(SubStreams):
    """A session with one guiServer (implements ``BackendSession``).

    Operations (:meth:`call`, :mod:`._ops`): ``version() -> dict``, ``relay(on)``,
    ``select(tokens)``, ``mkdir/rmdir/touch(path)``, ``rm(path, args="")``, ``mv(src, dst)``,
    ``cp(src, dst)``, ``ls(path, args="") -> list[str]``, ``get_file(path) -> bytes``,
    ``send_file(path, data, allow_nul=False) -> int``, ``vex2difx(pass_path, file,
    calc_only=False, wait=True)``, ``machines(input, manager=None, datastreams=None,
    processes=None, threads=None)``, ``start_job(input, function="USNO", force=False, wait=False,
    timeout=None) -> str | dict``, ``stop_job(job)``, ``wait_job(job, timeout=None) -> dict``,
    ``job_status(pattern) -> list[dict]``, ``jobs() -> dict``, the real-time monitor's ``monitor_*``
    (:mod:`._monitor`). ``jobs`` and ``wait_job`` read the session's own bookkeeping and also
    work while it is disconnected; every other operation then raises ``BackendUnavailable``.

    Errors: ``BackendRejected`` (unsafe or invalid argument: nothing was sent),
    ``BackendUnavailable`` (not connected), ``BackendTimeout``, ``UnknownOperation``.
    """

    backend = "guiserver"
    ops: ClassVar[Operations[Any]] = OPS

    def __init__(self, config: GuiserverSessionConfig) -> None:
        super().__init__(config, backoff_first=config.reconnect_backoff,
                         reconnect_attempts=config.reconnect_attempts)
        self.config: GuiserverSessionConfig = config
        self._cond = threading.Condition(self._lock)
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        #: why the connection went away while opening (for the error the open raises)
        self._broken = ""
        #: while opening: what the server sent besides the open's own sub-streams, published after Connected
        self._early: list[ServerEvent] | None = None
        self._pending: dict[int, _Pending] = {}
        self._ports = itertools.count(random.randint(20000, 30000))
        self._tx = Translator(self._ev)
        self._relay = config.relay
        self._selection = list(config.message_selection)
        self._next_resync = 0.0
        #: liveness: when the server last sent a byte, and when the probe now unanswered was sent
        self._last_rx = 0.0
        self._probe_sent: float | None = None
        #: while handshaking: when the version request now unanswered was first sent
        self._asking: float | None = None
        #: direct mode: our listeners and guiServer's back-connections (closed with the connection)
        self._direct_socks: set[socket.socket] = set()
        #: sub-streams the server opened; direct back-connections by port (:meth:`_stream_write`); monitors
        self._open_ports: set[int] = set()
        self._back: dict[int, socket.socket] = {}
        self._monitors: dict[int, Any] = {}
        self._threads: list[threading.Thread] = []
        self.setup_path = ""

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def stuck_for(self) -> float | None:
        """Seconds the server has left a version request unanswered (the handshake's, or the
        probe's of a connection silent for 2 s), once that is :data:`_STUCK_S` or more; else
        None. A stuck server is lost after ``request-timeout``. Lock-free (the actor's ping)."""
        since = self._asking if self._asking is not None else self._probe_sent
        if since is None:
            return None
        waited = time.monotonic() - since
        return waited if waited >= _STUCK_S else None

    # -- ending: join the threads once the lock is released (they need it to finish) --------------------
    #
    # ``release`` closes the TCP connection without stopping any job and without publishing
    # anything (pending calls fail as ``BackendUnavailable``); jobs run on and the new session
    # resyncs them from their ``.difxlog``. Beware: a real guiServer crashes a few seconds after a
    # client with a running job disconnects (docs/protocols/guiserver.md §7, item 2); the new
    # session then reconnects and resyncs as after any crash.

    def _ended(self) -> None:
        self._join()

    def _join(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, []
        me = threading.current_thread()
        for t in threads:
            if t is not me:
                t.join(JOIN_S)
                if t.is_alive():
                    self._log.warning("guiserver.thread.still_running", thread=t.name)

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=f"guiserver-{self.name}-{name}")
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    # -- hooks ---------------------------------------------------------------------------------------

    def _seed(self, known: Mapping[str, Event]) -> None:
        self._tx.seed(known)

    def _open(self, observed: Observed) -> Opened:
        """Connect, handshake, apply the settings and start the reader; then read the status of
        every job whose stream was lost. What the server sends meanwhile is held and published
        after ``Connected`` (in ``Opened.events``, before the resync results)."""
        cfg = self.config
        if not cfg.allow_remote and not _loopback(cfg.host):
            raise BackendRejected(f"host {cfg.host!r} is not loopback; guiServer is a remote shell "
                                  "(use an SSH tunnel, or set allow-remote)")
        sock, conn, early = self._handshake()
        info = conn.version
        assert info is not None
        self._sock, self._conn, self._early, self._broken = sock, conn, early, ""
        try:
            self._spawn(self._read, sock, conn, name="reader")
            rows = []
            for track in self._tx.orphans():
                status = self._status_rows(track, "resync", opening=True)
                if status is not None:
                    rows.append((track, status))
            if self._conn is not conn:
                raise BackendUnavailable(f"{self.address}: connection lost while opening ({self._broken})")
            held, self._early = self._early or [], None
            events = [e for ev in held for e in self._tx.translate(ev)]
            for track, status in rows:
                found = self._resynced(track, status)
                self._poll_later(track, bool(found))
                events += found
        except BaseException as exc:
            self._drop()
            if self._phase is Phase.CLOSED and isinstance(exc, BackendError):  # stop() came during a wait
                raise BackendRejected(f"stopped while opening: {exc}") from exc
            raise
        self._next_resync = time.monotonic() + _RESYNC_S
        self._last_rx, self._probe_sent = time.monotonic(), None
        self._log.info("guiserver.connected", address=self.address, version=info.version)
        announce: list[Event] = []
        if cfg.setup_path == "" and cfg.difx_version not in info.versions:
            announce.append(self._tx.log("warning", f"DiFX version {cfg.difx_version!r} not offered by the "
                                         f"server ({', '.join(info.versions) or 'none'})", "session"))
        return Opened(self.address, info.version, events, len(self._tx.states()), announce)

    def _opened(self) -> None:
        self._cond.notify_all()  # a wait_job may have been ended by the resync

    def _observe(self) -> None:
        """Hand silent job streams to the resync; ask the status of lost jobs every second."""
        self._probe()
        if self.config.job_silence_timeout > 0:
            self._tx.silent(self.config.job_silence_timeout)
        now = time.monotonic()
        due = [t for t in self._tx.orphans() if t.next_poll <= now]
        if not due or now < self._next_resync:
            return
        self._next_resync = now + _RESYNC_S
        for track in due:
            try:
                rows = self._status_rows(track, "resync")
            except (BackendUnavailable, BackendTimeout):
                if self._phase is Phase.UP:
                    raise  # the server did not answer: lost
                return  # the reader (or a failed send) already reported the loss
            if rows is not None:
                events = self._resynced(track, rows)
                self._publish(events)
                self._poll_later(track, bool(events))
        self._cond.notify_all()

    def _probe(self) -> None:
        """A server silent for ``_SILENCE_S`` gets a version request; no byte back within
        ``request-timeout`` is a loss (found within request-timeout + 2 s + one poll)."""
        conn, now = self._conn, time.monotonic()
        if conn is None or conn.state is not ConnState.READY:
            return
        if self._probe_sent is None:
            if now - self._last_rx >= _SILENCE_S:
                self._probe_sent = now
                self._send(conn.again())
        elif now - self._probe_sent > self.config.request_timeout:
            raise BackendTimeout(f"{self.address}: SERVER DID NOT RESPOND to a version request within "
                                 f"{self.config.request_timeout:g} s (silent for {now - self._last_rx:.1f} s)")

    def _drop(self) -> None:
        sock, self._sock, self._conn, self._early = self._sock, None, None, None
        self._probe_sent = None
        socks, self._direct_socks = self._direct_socks, set()
        self._pending.clear()
        self._open_ports.clear()
        self._back.clear()
        for mon in self._monitors.values():
            mon.lost()
        self._monitors.clear()
        for s in ([sock] if sock is not None else []) + list(socks):
            _close(s)
        self._cond.notify_all()

    def _lost(self, reason: str) -> None:
        self._drop()
        self._tx.orphan_running(reason)

    def _kill(self) -> None:
        if self._lock.acquire(blocking=False):  # ours already (kill got it), or free
            try:
                self._drop()
            finally:
                self._lock.release()
            return
        for s in [self._sock, *list(self._direct_socks)]:  # a poll or call holds the lock: sockets only
            if s is not None:
                _close(s)

    def _poll_interval(self) -> float:
        return _POLL_S

    # -- the connection --------------------------------------------------------------------------------

    def _handshake(self) -> tuple[socket.socket, Connection, list[ServerEvent]]:
        """Open, handshake (8 .. 18), then send 13, 19 or 20, 1 and 17. Returns the socket, the
        connection and what came after the version reply."""
        cfg = self.config
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.request_timeout)
        except TimeoutError as exc:
            raise BackendTimeout(f"connect {self.address}: {exc}") from exc
        except OSError as exc:
            raise BackendUnavailable(f"connect {self.address}: {exc}") from exc
        conn = Connection(cfg.max_packet)
        deadline = time.monotonic() + cfg.request_timeout
        early: list[ServerEvent] = []
        try:
            _keepalive(sock, cfg.request_timeout)
            sock.sendall(conn.start())
            self._asking = time.monotonic()
            resend, heard = time.monotonic() + _RESEND_S, False
            while conn.state is ConnState.HANDSHAKE:
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError("version request")
                if now >= resend and not heard:  # nothing back yet: the request may have been lost
                    sock.sendall(conn.again())
                    resend = now + _RESEND_S
                sock.settimeout(max(0.01, min(deadline, resend) - now))
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    raise BackendUnavailable(f"{self.address} closed the connection during the handshake")
                heard, self._asking = True, None
                early += conn.receive(data)
            info = conn.version
            assert info is not None
            setup = cfg.setup_path or f"{info.difx_base}/bin/rungeneric.{cfg.difx_version}"
            if not cfg.setup_path and not _SAFE_SETUP.fullmatch(setup):
                raise BackendProtocolError(f"server DiFX base {info.difx_base!r} gives an unsafe setup path")
            self.setup_path = setup
            sock.settimeout(None)
            sock.sendall(encode(PacketId.DIFX_SETUP_PATH, setup.encode())
                         + encode(PacketId.CHANNEL_ALL_DATA_ON if cfg.channelled else PacketId.CHANNEL_ALL_DATA_OFF)
                         + self._settings())
        except TimeoutError as exc:
            sock.close()
            raise BackendTimeout(f"{self.address}: SERVER DID NOT RESPOND to the version request") from exc
        except OSError as exc:
            sock.close()
            raise BackendUnavailable(f"handshake with {self.address}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        finally:
            self._asking = None
        after = early[early.index(info) + 1:] if info in early else []
        return sock, conn, [ev for ev in after if not isinstance(ev, VersionInfo)]

    def _settings(self) -> bytes:
        selection = self._selection or ["ALL_MESSAGES"]
        return (encode(PacketId.RELAY, encode_int(1 if self._relay else 0))
                + encode(PacketId.MESSAGE_SELECTION, "\n".join(selection).encode()))

    def _read(self, sock: socket.socket, conn: Connection) -> None:
        """The reader thread of one connection: feed every byte to ``conn``; report its end."""
        reason = "connection closed by guiServer"
        protocol_error: BackendProtocolError | None = None
        try:
            while data := sock.recv(65536):
                with self._lock:
                    if self._conn is not conn:
                        return
                    self._last_rx, self._probe_sent = time.monotonic(), None
                    self._handle(conn.receive(data))
            with self._lock:
                if self._conn is conn:
                    conn.eof()
        except BackendProtocolError as exc:
            protocol_error, reason = exc, f"protocol error: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc}"
        except Exception as exc:  # noqa: BLE001 - the reader must never die silently
            reason = f"reader failed: {exc!r}"
        with self._lock:
            if self._conn is not conn:
                return  # dropped on purpose (stop, release, kill) or already reported
            if self._phase is not Phase.UP:  # opening: the open fails with this reason
                self._broken = reason
                self._drop()
                return
            if protocol_error is not None:
                self._publish([self._ev(ErrorEvent, error_type="flowbus.schemas.BackendProtocolError",
                                        message=str(protocol_error), operation="receive")])
            self._on_lost(reason)

    def _send(self, data: bytes) -> None:
        """Send on the main connection; a failure is a loss. Lock held or taken."""
        with self._lock:
            sock = self._sock
            if sock is None:
                raise BackendUnavailable(f"session {self.name!r}: not connected to {self.address}")
            try:
                sock.sendall(data)
            except OSError as exc:
                if self._phase is Phase.UP:
                    self._on_lost(f"send failed: {exc}")
                else:
                    self._drop()
                raise BackendUnavailable(f"send to {self.address}: {exc}") from exc

    def _send_op(self, operation: str, data: bytes) -> None:
        """A fire-and-forget operation: nothing comes back."""
        with self._lock:
            self._require_up(operation)
            self._send(data)

    # -- inbound -------------------------------------------------------------------------------------

    def _handle(self, events: Iterable[ServerEvent]) -> None:
        for ev in events:
            if isinstance(ev, StreamPacket | StreamItem):
                op = self._pending.get(ev.port)
                if op is not None:
                    op.items.append(ev)
                    if op.on_item is not None:
                        op.on_item(ev)
                    if isinstance(ev, StreamItem):
                        op.done = ev.data is None
                    else:
                        op.done = op.kind is not StreamKind.FRAMED or ev.id in op.terminal
                    self._cond.notify_all()
                    continue
            if isinstance(ev, ChannelOpened):
                self._open_ports.add(ev.port)
                self._cond.notify_all()
            if self._early is not None:
                self._early.append(ev)
                continue
            out = self._tx.translate(ev)
            if out:
                self._publish(out)
                self._cond.notify_all()

    # -- job status ------------------------------------------------------------------------------------

    def _job_status(self, pattern: str, timeout: float | None, operation: str = "job_status", *,
                    opening: bool = False) -> list[dict[str, Any]]:
        """GET_JOB_STATUS for an already checked ``pattern``: one row per ``.input`` found."""
        items = self._stream(operation, StreamKind.FRAMED, lambda port: encode(
            PacketId.GET_JOB_STATUS, encode_int(1) + encode_string(pattern)
            + encode_string("" if self.config.channelled else "127.0.0.1") + encode_int(port)),
            timeout, opening=opening)
        return self._tx.status_rows(items)

    def _status_rows(self, track: JobTrack, operation: str, *, opening: bool = False) -> list[dict[str, Any]] | None:
        """The status rows of a job whose stream was lost (None when its input cannot be asked for)."""
        try:
            pattern = check.path(track.input, self.config.allowed_dirs, glob=True, what="input")
        except BackendRejected as exc:
            self._log.warning("guiserver.resync.refused", job=track.name, error=str(exc))
            return None
        return self._job_status(pattern, None, operation, opening=opening)

    @staticmethod
    def _poll_later(track: JobTrack, changed: bool) -> None:
        """The next status request for an orphan: 1 s after news, else twice the last gap (at most
        a minute), so a job whose .difxlog stays empty is not asked for every second forever."""
        track.poll_every = _RESYNC_S if changed or not track.poll_every else min(2 * track.poll_every, _RESYNC_MAX_S)
        track.next_poll = time.monotonic() + track.poll_every

    def _resynced(self, track: JobTrack, rows: list[dict[str, Any]]) -> list[Event]:
        return [e for row in rows if row["job"] == track.name for e in self._tx.resynced(track, row)]


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() or accept()
    except OSError:
        pass
    sock.close()


def _keepalive(sock: socket.socket, idle: float) -> None:
    """TCP keepalive, so a host that vanished is found even while nothing is sent."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    interval, count = _KEEPALIVE
    for opt, value in (("TCP_KEEPIDLE", max(1, int(idle))), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["JOIN_S", "GuiserverSession"]
