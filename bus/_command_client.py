"""The client end of the command socket (see ``_commands``): small on purpose, so ``flowbus call``
imports zmq, msgpack and the error types and nothing else (msgpack, not msgspec: it loads in a
tenth of the time, and a command is one small map each way)."""

from __future__ import annotations

import itertools
import socket
import time
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from flowbus.schemas import BusBroken, BusClosed, FlowbusError, all_error_types

if TYPE_CHECKING:
    from ._curve import ClientCurve


def rebuild_error(reply: dict[str, Any]) -> FlowbusError:
    """Our own exception type from a reply's ``error_type`` (by class name), else FlowbusError."""
    name, message = str(reply.get("error_type", "")), str(reply.get("message", ""))
    args = reply.get("args") or [message]
    for cls in all_error_types():
        if cls.__name__ == name:
            try:
                return cls(*args)
            except TypeError:
                return cls(message)
    return FlowbusError(f"{name}: {message}" if name else message)


def probe(endpoint: str, timeout: float = 2.0) -> None:
    """BusBroken at once when nothing listens at ``endpoint`` (ZeroMQ itself would retry the
    connection quietly until the call's whole time limit ran out)."""
    try:
        if endpoint.startswith("ipc://"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(endpoint[len("ipc://"):])
        elif endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://"):].rpartition(":")
            if port.isdigit():
                socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BusBroken(f"nothing answers at {endpoint} ({exc.strerror or exc}): is `flowbus up` running?") from None


class Commander:
    """One command at a time over a DEALER to the broker's command socket (one per thread)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, curve: ClientCurve | None = None) -> None:
        self.ctx, self.endpoint, self.curve = ctx, endpoint, curve
        self._ids = itertools.count(1)
        self._sock: zmq.Socket[Any] | None = None
        self._closed = False

    def call(self, op: str, timeout: float, **args: Any) -> Any:
        """Send one command and return its result; raise the remote error (ours by type) or
        BusBroken when no reply comes within ``timeout`` (plus a margin for the round trip)."""
        if self._closed:
            raise BusClosed("command channel is closed")
        if self._sock is None:
            probe(self.endpoint)
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(self.endpoint)
            self._sock = sock
        sock = self._sock
        rid = next(self._ids)
        sock.send(msgpack.packb({"op": op, "id": rid, "timeout": timeout, **args}, use_bin_type=True))
        started = time.monotonic()
        deadline = started + timeout + 5.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000), zmq.POLLIN):
                self._sock = None
                sock.close(0)
                raise BusBroken(f"no answer to {op!r} from {self.endpoint} within "
                                f"{deadline - started:.0f} s")
            try:
                reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException) as exc:
                raise BusBroken(f"a reply from {self.endpoint} that is not msgpack: {exc}") from None
            if not isinstance(reply, dict) or reply.get("id") != rid:
                continue  # a late answer to an earlier call
            if "extend" in reply:  # the operation's own bound is longer than our limit: wait for it
                deadline = max(deadline, time.monotonic() + float(reply["extend"]) + 5.0)
                continue
            if not reply.get("ok"):
                raise rebuild_error(reply)
            return reply.get("result")

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
