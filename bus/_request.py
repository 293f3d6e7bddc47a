"""Request/reply with the broker over a DEALER: ids, timeouts, and a fresh socket after a timeout."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import zmq

from flowbus.schemas import BusBroken, BusClosed, BusRequestError

from . import _framing as fr
from ._command_client import probe
from ._endpoints import check_endpoint

if TYPE_CHECKING:
    from ._curve import ClientCurve


class Requester:
    """One request at a time (not thread-safe: one per thread)."""

    def __init__(self, ctx: zmq.Context[Any], address: str, curve: ClientCurve | None = None,
                 timeout: float = 5.0) -> None:
        self.ctx, self.address, self.curve, self.timeout = ctx, check_endpoint(address), curve, timeout
        self._ids = itertools.count(1)
        self._sock: zmq.Socket[Any] | None = None
        self._closed = False
        self._probed = False

    def _socket(self) -> zmq.Socket[Any]:
        if self._closed:
            raise BusClosed("request channel is closed")
        if self._sock is None:
            if not self._probed:  # nothing listening at all: say so now, not after the whole timeout
                self._probed = True  # (later reconnects wait: a restarting broker comes back)
                probe(self.address)
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.reconnect_ivl = 20
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(self.address)
            self._sock = sock
        return self._sock

    def call(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request; return the reply map or raise ``BusBroken``/``BusRequestError``."""
        sock = self._socket()
        rid = next(self._ids)
        sock.send(fr.pack({"op": op, "id": rid, **args}))
        deadline_ms = int(1000 * (self.timeout if timeout is None else timeout))
        while True:
            if not sock.poll(deadline_ms, zmq.POLLIN):
                self._sock = None
                sock.close(0)  # drop anything in flight; the next call starts clean
                raise BusBroken(f"no reply from the broker at {self.address} to {op!r} within {deadline_ms / 1000:g} s")
            reply = fr.unpack(sock.recv())
            if reply.get("id") != rid:
                continue  # a late answer to an earlier, timed-out request
            if not reply.get("ok"):
                raise BusRequestError(f"{op}: {reply.get('error')} [{reply.get('code')}]")
            return reply  # type: ignore[no-any-return]  # unpacked msgpack

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


def connect_dealer(ctx: zmq.Context[Any], endpoint: str, curve: ClientCurve | None = None, *,
                   routing_id: bytes | None = None) -> zmq.Socket[Any]:
    """A DEALER to one of the broker's sockets, as the bus's long-lived clients use it: no linger,
    quick reconnects (20 ms, backing off to 0.5 s), CURVE when configured."""
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    if routing_id is not None:
        sock.routing_id = routing_id
    sock.linger = 0
    sock.reconnect_ivl = 20
    sock.reconnect_ivl_max = 500
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    return sock


def broker_info(ctx: zmq.Context[Any], address: str, curve: ClientCurve | None, timeout: float) -> dict[str, Any]:
    """Ask the broker at ``address`` (its request endpoint) for its other endpoints."""
    req = Requester(ctx, address, curve, timeout)
    try:
        return req.call("info")
    finally:
        req.close()


def same_host(endpoint: str, address: str) -> str:
    """Endpoints the broker reports may name a wildcard host; keep the host the client used.
    An ipc endpoint is a path and is taken as reported."""
    if endpoint.startswith("ipc://") or not address.startswith("tcp://"):
        return endpoint
    host = address.rsplit(":", 1)[0]
    port = endpoint.rsplit(":", 1)[1]
    return f"{host}:{port}"
