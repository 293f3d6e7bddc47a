"""Sub-stream plumbing of the guiServer session: the requests whose answer comes on a sub-stream
of its own (channelled, or a back-connection from guiServer in direct mode), and the bookkeeping of
the ports they wait on. :class:`~._session.GuiserverSession` builds on :class:`SubStreams`; the
operations (:mod:`._ops`, :mod:`._ops_extra`, :mod:`._monitor`) call these methods."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flowbus.schemas import (
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ErrorEvent,
    GuiserverSessionConfig,
)

from .._session import SessionBase
from ._events import Translator
from .protocol import STATUS_TERMINAL, Connection, ServerEvent, StreamKind, channel_data


@dataclass
class _Pending:
    """An operation waiting for the end of its sub-stream."""

    port: int
    kind: StreamKind
    terminal: frozenset[int] = frozenset()
    items: list[Any] = field(default_factory=list)
    done: bool = False
    #: called (lock held) with each item as it arrives, e.g. to publish vex2difx results at once
    on_item: Callable[[Any], None] | None = None


class SubStreams(SessionBase):
    """The sub-stream half of :class:`~._session.GuiserverSession` (which sets these attributes
    and implements the three connection methods below)."""

    config: GuiserverSessionConfig
    _cond: threading.Condition
    _conn: Connection | None
    #: why the connection went away while opening (for the error the open raises)
    _broken: str
    _pending: dict[int, _Pending]
    _ports: Iterator[int]
    _tx: Translator
    #: direct mode: our listeners and guiServer's back-connections (closed with the connection)
    _direct_socks: set[socket.socket]
    #: sub-streams the server opened; direct back-connections by port (:meth:`_stream_write`)
    _open_ports: set[int]
    _back: dict[int, socket.socket]

    def _send(self, data: bytes) -> None:
        """Send on the main connection; a failure is a loss. Lock held or taken."""
        raise NotImplementedError

    def _handle(self, events: Iterable[ServerEvent]) -> None:
        raise NotImplementedError

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        raise NotImplementedError

    def _stream_write(self, port: int, data: bytes) -> None:
        """Client -> server bytes on an opened sub-stream: CHANNEL_DATA, or the back-connection. Lock held."""
        sock = self._back.get(port)
        if self.config.channelled or sock is None:
            self._send(channel_data(port, data))
            return
        try:
            sock.sendall(data)
        except OSError as exc:
            raise BackendUnavailable(f"sub-stream {port} to {self.address}: {exc}") from exc

    def _where(self, port: int) -> list[tuple[str, str | int]]:
        """The ``<address>``/``<port>`` fields: direct mode names our loopback listener."""
        return [("port", port)] if self.config.channelled else [("address", "127.0.0.1"), ("port", port)]

    def _open_port(self, kind: StreamKind, terminal: frozenset[int], upload: bytes = b"") -> int:
        """A sub-stream id: a counter (channelled) or our loopback listener's port (direct). Lock held."""
        conn = self._conn
        assert conn is not None
        if self.config.channelled:
            port = next(self._ports)
        else:
            listener = socket.create_server(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            self._direct_socks.add(listener)
            self._spawn(self._direct, listener, port, conn, upload, name=f"direct-{port}")
        conn.expect(port, kind, terminal)
        return port

    def _direct(self, listener: socket.socket, port: int, conn: Connection, upload: bytes) -> None:
        """Direct mode: accept guiServer's back-connection, feed its bytes, treat close as the end."""
        try:
            listener.settimeout(self.config.request_timeout)
            try:
                sock, _ = listener.accept()
            finally:
                with self._lock:
                    self._direct_socks.discard(listener)
                listener.close()
            with sock:
                with self._lock:
                    if self._conn is not conn:
                        return
                    self._direct_socks.add(sock)
                    self._back[port] = sock
                    self._open_ports.add(port)
                    self._cond.notify_all()
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
                if self._conn is conn:
                    self._publish([self._ev(ErrorEvent, error_type="flowbus.schemas.BackendProtocolError",
                                            message=str(exc), operation=f"sub-stream {port}")])
        except OSError as exc:
            if self._conn is conn:
                self._log.warning("guiserver.direct.failed", port=port, error=str(exc))
        with self._lock:
            self._back.pop(port, None)
            if self._conn is conn:
                op = self._pending.get(port)
                if op is not None:
                    op.done = True
                self._tx.stream_closed(port)
                self._cond.notify_all()

    def _stream(self, operation: str, kind: StreamKind, build: Callable[[int], bytes], timeout: float | None,
                upload: bytes = b"", on_item: Callable[[Any], None] | None = None,
                terminal: frozenset[int] = STATUS_TERMINAL, *, opening: bool = False) -> list[Any]:
        """Register a port, send ``build(port)``, wait until its stream ends; return its items.
        Only the open's own requests (``opening``) run while the session is not UP."""
        with self._lock:
            if not opening:
                self._require_up(operation)
            conn = self._conn
            if conn is None:
                raise BackendUnavailable(f"{operation}: session {self.name!r} is not connected to {self.address}")
            port = self._open_port(kind, terminal if kind is StreamKind.FRAMED else frozenset(), upload)
            op = self._pending[port] = _Pending(port, kind, terminal, on_item=on_item)
            limit = timeout or self.config.request_timeout
            try:
                self._send(build(port))
                self._cond.wait_for(lambda: op.done or self._conn is not conn, limit)
            finally:
                self._pending.pop(port, None)
                if self._conn is conn:
                    conn.forget(port)
            if not op.done:
                if self._conn is not conn:
                    why = f" ({self._broken})" if self._broken else ""
                    raise BackendUnavailable(f"{operation}: connection to {self.address} lost during the request{why}")
                raise BackendTimeout(f"{operation}: no end of sub-stream {port} within {limit} s")
            return op.items


__all__ = ["SubStreams"]
