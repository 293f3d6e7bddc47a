"""The DiFX guiServer session (spec: docs/protocols/guiserver.md).

One TCP connection; the version handshake (8 -> ... 18) before anything else, then always the
setup path (13), channelled mode (19), relay on/off (1) and the message selection (17). A reader
thread feeds the sans-I/O :class:`~._gs_protocol.Connection` and turns what it returns into typed
events: relayed DifxStatusMessage -> ``StateChanged`` + ``AttributeChanged(kind="progress")``,
alerts/info/server texts/job output -> ``LogLine``, job-run sub-packets -> ``StateChanged``.

Recovery: EOF, a socket error or a protocol error publishes ``Disconnected`` at once; ``poll``
reconnects with backoff, re-applies the settings and asks GET_JOB_STATUS for every job whose
stream was lost, publishing what the ``.difxlog`` says with ``observed=resync``.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from flowbus.schemas import (
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Connected,
    Disconnected,
    ErrorEvent,
    Event,
    GuiserverSessionConfig,
    RecoveryAttempted,
    RecoveryGaveUp,
)

from ._base import Backoff, Emit, dispatch
from ._gs_events import Translator
from ._gs_ops import OPERATIONS, GuiserverOperations
from ._gs_protocol import (
    STATUS_TERMINAL,
    Connection,
    ConnState,
    PacketId,
    ServerEvent,
    StreamItem,
    StreamKind,
    StreamPacket,
    encode,
    encode_int,
)


@dataclass
class _Op:
    """A pending operation that reads a sub-stream."""

    port: int
    kind: StreamKind
    terminal: frozenset[int] = frozenset()
    items: list[Any] = field(default_factory=list)
    done: bool = False
    #: called (lock held) with each item as it arrives, e.g. to publish vex2difx results at once
    on_item: Callable[[Any], None] | None = None


class GuiserverSession(GuiserverOperations):
    """A session with one guiServer (implements ``BackendSession``).

    Operations (:meth:`call`): ``version() -> dict``, ``relay(on)``, ``select(tokens)``,
    ``mkdir/rmdir/touch(path)``, ``rm(path, args="")``, ``mv(src, dst)``, ``cp(src, dst)``,
    ``ls(path, args="") -> list[str]``, ``get_file(path) -> bytes``, ``send_file(path, data,
    allow_nul=False) -> int``, ``vex2difx(pass_path, file, calc_only=False, wait=True)``,
    ``machines(input, manager=None, datastreams=None, processes=None, threads=None)``,
    ``start_job(input, function="USNO", force=False, wait=False, timeout=None) -> str | dict``,
    ``stop_job(job)``, ``wait_job(job, timeout=None) -> dict``, ``job_status(pattern) ->
    list[dict]``, ``jobs() -> dict``.

    Errors: ``BackendRejected`` (unsafe or invalid argument: nothing was sent),
    ``BackendUnavailable`` (not connected), ``BackendTimeout``, ``UnknownOperation``.
    """

    backend = "guiserver"

    def __init__(self, config: GuiserverSessionConfig) -> None:
        self.config = config
        self.name = config.name
        self._log = structlog.get_logger("flowbus.guiserver").bind(backend="guiserver", session_id=config.name)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._emit: Emit | None = None
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._ops: dict[int, _Op] = {}
        self._ports = itertools.count(random.randint(20000, 30000))
        self._tx = Translator(self._ev)
        self._up = False
        self._closed = False
        self._relay = config.relay
        self._selection = list(config.message_selection)
        self._backoff = Backoff(first=config.reconnect_backoff, cap=max(30.0, config.reconnect_backoff))
        self._attempts = 0
        self._next_resync = 0.0
        self.setup_path = ""

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, emit: Emit, known: Mapping[str, Event], *, previous_address: str | None = None) -> None:
        """Connect and handshake, publish ``Connected``, then resync jobs ``known`` as unfinished.
        Raises ``BackendUnavailable``/``BackendTimeout``; ``BackendProtocolError`` for garbage in
        the handshake; ``BackendRejected`` for a remote host without ``allow-remote``."""
        if not self.config.allow_remote and not _loopback(self.config.host):
            raise BackendRejected(f"host {self.config.host!r} is not loopback; guiServer is a remote shell "
                                  "(use an SSH tunnel, or set allow-remote)")
        with self._lock:
            if self._emit is not None:
                raise BackendRejected(f"start: session {self.name!r} was already started")
            self._emit = emit
            self._tx.seed(known)
            try:
                self._connect()
            except BaseException:
                self._emit = None
                raise
        self._resync()

    def poll(self) -> float:
        """Reconnect when due (then resync); re-ask the status of orphaned jobs every second."""
        with self._lock:
            if self._closed or self._emit is None:
                return 1.0
            if self._up:
                if self.config.job_silence_timeout > 0:
                    self._tx.silent(self.config.job_silence_timeout)
                if not self._tx.orphans() or time.monotonic() < self._next_resync:
                    return 0.2
                self._next_resync = time.monotonic() + 1.0
            else:
                if not self._backoff.ready():
                    return max(0.01, min(0.5, self._backoff.not_before - time.monotonic()))
                if not self._reconnect():
                    return 0.05 if not self._closed else 1.0
        self._resync()
        return 0.2

    def _reconnect(self) -> bool:
        self._attempts += 1
        attempt = self._attempts
        try:
            self._connect()
        except (BackendUnavailable, BackendProtocolError) as exc:
            self._publish(self._ev(RecoveryAttempted, action="reconnect", attempt=self._attempts, ok=False,
                                   reason=str(exc)))
            limit = self.config.reconnect_attempts
            if limit and self._attempts >= limit:
                self._closed = True
                self._publish(self._ev(RecoveryGaveUp, attempts=self._attempts, reason=str(exc)))
            else:
                self._backoff.next()
            return False
        self._publish(self._ev(RecoveryAttempted, action="reconnect", attempt=attempt, ok=True))
        return True

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        return dispatch(self, OPERATIONS, operation, *args, **kwargs)

    def operations(self) -> list[str]:
        return sorted(OPERATIONS)

    def stop(self) -> None:
        """Close the connection; publish ``Disconnected(will_retry=False)``."""
        with self._lock:
            if self._closed and not self._up:
                return
            was_up = self._up
            self._closed = True
            self._drop()
            if was_up:
                self._publish(self._ev(Disconnected, reason="stopped", will_retry=False))
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(5)

    def release(self) -> None:
        """Let go of guiServer for a newer incarnation: close the TCP connection without
        stopping any job and without publishing anything (pending calls fail as
        ``BackendUnavailable``). Jobs run on; the new session resyncs them from their
        ``.difxlog``. Beware: a real guiServer crashes a few seconds after a client with a running
        job disconnects (docs/protocols/guiserver.md §7, item 2); the new session then reconnects and resyncs
        as after any crash."""
        with self._lock:
            if self._closed and self._emit is None:
                return
            self._closed = True
            self._emit = None
            self._drop()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(5)
        self._log.info("guiserver.session.released", address=self.address)

    def kill(self) -> None:
        """Immediate, best effort: close the socket (no Disconnected event); never raises."""
        got = self._lock.acquire(timeout=1.0)
        try:
            self._closed = True
            sock = self._sock
            if got:
                self._drop()
            elif sock is not None:
                sock.close()
        except Exception as exc:  # noqa: BLE001 - kill never raises, by contract
            self._log.warning("guiserver.kill.failed", error=repr(exc))
        finally:
            if got:
                self._lock.release()

    # -- connection ----------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open, handshake (8 .. 18), then 13, 19, 1 and 17; start the reader. Lock held."""
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
            sock.sendall(conn.start())
            while conn.state is ConnState.HANDSHAKE:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(65536)
                if not data:
                    raise BackendUnavailable(f"{self.address} closed the connection during the handshake")
                early += conn.receive(data)
            info = conn.version
            assert info is not None
            self.setup_path = cfg.setup_path or f"{info.difx_base}/bin/rungeneric.{cfg.difx_version}"
            if not cfg.setup_path and not _SAFE_SETUP.fullmatch(self.setup_path):
                raise BackendProtocolError(f"server DiFX base {info.difx_base!r} gives an unsafe setup path")
            sock.settimeout(None)
            sock.sendall(encode(PacketId.DIFX_SETUP_PATH, self.setup_path.encode())
                         + encode(PacketId.CHANNEL_ALL_DATA_ON if cfg.channelled else PacketId.CHANNEL_ALL_DATA_OFF)
                         + self._settings())
        except TimeoutError as exc:
            sock.close()
            raise BackendTimeout(f"{self.address}: SERVER DID NOT RESPOND to the version request") from exc
        except (OSError, BackendProtocolError) as exc:
            sock.close()
            if isinstance(exc, BackendProtocolError):
                raise
            raise BackendUnavailable(f"handshake with {self.address}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        self._sock, self._conn, self._up = sock, conn, True
        self._attempts = 0
        self._backoff.reset()
        self._log.info("guiserver.connected", address=self.address, version=info.version)
        self._publish(self._ev(Connected, address=self.address, detail=info.version))
        if cfg.setup_path == "" and cfg.difx_version not in info.versions:
            self._publish(self._tx.log("warning", f"DiFX version {cfg.difx_version!r} not offered by the "
                                       f"server ({', '.join(info.versions) or 'none'})", "session"))
        self._handle(early[early.index(info) + 1:] if info in early else [])
        self._reader = threading.Thread(target=self._read, args=(sock, conn), daemon=True,
                                        name=f"guiserver-{self.name}")
        self._reader.start()

    def _settings(self) -> bytes:
        selection = self._selection or ["ALL_MESSAGES"]
        return (encode(PacketId.RELAY, encode_int(1 if self._relay else 0))
                + encode(PacketId.MESSAGE_SELECTION, "\n".join(selection).encode()))

    def _read(self, sock: socket.socket, conn: Connection) -> None:
        reason = "connection closed by guiServer"
        protocol_error: BackendProtocolError | None = None
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    with self._lock:
                        conn.eof()
                    break
                with self._lock:
                    if self._conn is not conn:
                        return
                    self._handle(conn.receive(data))
        except BackendProtocolError as exc:
            protocol_error, reason = exc, f"protocol error: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc}"
        except Exception as exc:  # noqa: BLE001 - the reader must never die silently
            reason = f"reader failed: {exc!r}"
        with self._lock:
            if self._conn is not conn:
                return
            if protocol_error is not None:
                self._publish(self._ev(ErrorEvent, error_type="flowbus.schemas.BackendProtocolError",
                                       message=str(protocol_error), operation="receive"))
            self._lost(reason)

    def _lost(self, reason: str) -> None:
        """The connection is gone: publish ``Disconnected`` and fail pending waits. Lock held."""
        self._drop()
        self._tx.orphan_running()
        self._log.warning("guiserver.disconnected", reason=reason)
        self._publish(self._ev(Disconnected, reason=reason, will_retry=not self._closed))
        self._backoff.next()

    def _drop(self) -> None:
        sock, self._sock, self._conn, self._up = self._sock, None, None, False
        self._ops.clear()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._cond.notify_all()

    def _send(self, data: bytes) -> None:
        with self._lock:
            if not self._up or self._sock is None:
                raise BackendUnavailable(f"not connected to {self.address}")
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                raise BackendUnavailable(f"send to {self.address}: {exc}") from exc

    # -- inbound -------------------------------------------------------------------------------------

    def _handle(self, events: list[ServerEvent]) -> None:
        for ev in events:
            if isinstance(ev, StreamPacket | StreamItem):
                op = self._ops.get(ev.port)
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
            out = self._tx.translate(ev)
            for e in out:
                self._publish(e)
            if out:
                self._cond.notify_all()

    def _publish(self, event: Event) -> None:
        if self._emit is not None:
            self._emit(event)

    def _ev(self, cls: type[Any], **fields: Any) -> Any:
        fields.setdefault("key", "")
        return cls(source=self.name, backend=self.backend, **fields)

    # -- sub-stream requests -------------------------------------------------------------------------

    def _open_port(self, kind: StreamKind, terminal: frozenset[int], upload: bytes = b"") -> int:
        """A sub-stream id: a counter (channelled) or our loopback listener's port (direct). Lock held."""
        assert self._conn is not None
        if self.config.channelled:
            port = next(self._ports)
        else:
            listener = socket.create_server(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            threading.Thread(target=self._direct, args=(listener, port, self._conn, upload), daemon=True,
                             name=f"guiserver-{self.name}-{port}").start()
        self._conn.expect(port, kind, terminal)
        return port

    def _direct(self, listener: socket.socket, port: int, conn: Connection, upload: bytes) -> None:
        """Direct mode: accept guiServer's back-connection, feed its bytes, treat close as the end."""
        try:
            listener.settimeout(self.config.request_timeout)
            try:
                sock, _ = listener.accept()
            finally:
                listener.close()
            with sock:
                sock.settimeout(None)
                if upload:
                    sock.sendall(upload)
                while data := sock.recv(65536):
                    with self._lock:
                        if self._conn is not conn:
                            return
                        self._handle(conn.stream_data(port, data))
        except BackendProtocolError as exc:
            with self._lock:
                self._publish(self._ev(ErrorEvent, error_type="flowbus.schemas.BackendProtocolError",
                                       message=str(exc), operation=f"sub-stream {port}"))
        except OSError as exc:
            self._log.warning("guiserver.direct.failed", port=port, error=str(exc))
        with self._lock:
            if self._conn is conn:
                op = self._ops.get(port)
                if op is not None:
                    op.done = True
                self._tx.stream_closed(port)
                self._cond.notify_all()

    def _stream(self, kind: StreamKind, build: Callable[[int], bytes], timeout: float | None,
                upload: bytes = b"", on_item: Callable[[Any], None] | None = None,
                terminal: frozenset[int] = STATUS_TERMINAL) -> list[Any]:
        """Register a port, send ``build(port)``, wait until its stream ends; return its items."""
        with self._lock:
            if not self._up or self._conn is None:
                raise BackendUnavailable(f"not connected to {self.address}")
            port = self._open_port(kind, terminal if kind is StreamKind.FRAMED else frozenset(), upload)
            op = self._ops[port] = _Op(port, kind, terminal, on_item=on_item)
            conn = self._conn
            try:
                self._send(build(port))
                ok = self._cond.wait_for(lambda: op.done or self._conn is not conn,
                                         timeout or self.config.request_timeout)
            finally:
                self._ops.pop(port, None)
                if self._conn is conn:
                    conn.forget(port)
            if not op.done:
                if self._conn is not conn:
                    raise BackendUnavailable(f"connection to {self.address} lost during the request")
                raise BackendTimeout(f"no end of sub-stream {port} within {timeout or self.config.request_timeout} s")
            del ok
            return op.items

    # -- recovery ------------------------------------------------------------------------------------

    def _resync(self) -> None:
        """Ask the ``.difxlog`` of every job whose stream was lost; publish with ``observed=resync``."""
        for track in self._tx.orphans():
            try:
                rows = self.job_status(track.input)
            except (BackendUnavailable, BackendRejected) as exc:
                self._log.warning("guiserver.resync.failed", job=track.name, error=str(exc))
                return
            with self._lock:
                for row in rows:
                    if row["job"] == track.name:
                        for event in self._tx.resynced(track, row):
                            self._publish(event)
                self._cond.notify_all()


_SAFE_SETUP = re.compile(r"/[A-Za-z0-9_./+@:=,%-]*")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["OPERATIONS", "GuiserverSession", "GuiserverSessionConfig"]
