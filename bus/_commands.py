"""Commands through the bus: one authenticated front door for ``flowbus call`` and ``Client.call``.

The broker's command socket (ROUTER; ``<ipc-dir>/owner/command``, or TCP with CurveZMQ in the
write domain, where read-only keys are not admitted) takes requests from clients and forwards
them to the one worker that serves them: the ``flowbus up`` (or the chart's controller) that
runs the Supervisor. Clients never join Ray, so a call costs a round trip, not a Ray driver.

Frames after the ROUTER identity:

* client → broker ``[body]``; body a msgpack map ``{"op", "id", ...}`` (``call``: ``session``,
  ``operation``, ``args``, ``kwargs``, ``timeout``; ``rules``; ``sessions``)
* broker → worker ``[client_id, body]``; worker → broker ``[b"W", b"reply", client_id, reply]``
* worker → broker ``[b"W", b"serve", {"proof": mac}]`` once a second: the worker proves it holds
  the bus's grant key (when the broker has one), so no other process can take over commands
* replies ``{"id", "ok", "result"}`` or ``{"id", "ok": False, "error_type", "message", "args"}``
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import zmq

from flowbus.schemas import FlowbusError, all_error_types

from . import _framing as fr
from ._request import connect_dealer

if TYPE_CHECKING:
    from ._curve import ClientCurve

if TYPE_CHECKING:
    from ._broker import Broker

log = structlog.get_logger("flowbus.commands")

WORKER = b"W"
SERVE = b"serve"
REPLY = b"reply"
#: a worker silent this long no longer serves
WORKER_TIMEOUT = 3.0
SERVE_EVERY = 0.5
_PROOF_CONTEXT = b"flowbus-command-worker-v1"
_MAX_WAITING = 256
_DRAIN = 1000


def worker_proof(key: bytes | None) -> bytes:
    return hmac.new(key, _PROOF_CONTEXT, hashlib.sha256).digest() if key else b""


class CommandRouter:
    """The broker's side: forward client requests to the worker and replies back. Stateless per
    call (nothing is held for a client), bounded by the socket's queue."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.worker: bytes | None = None
        self.worker_seen = 0.0
        #: commands that came while no worker was registered (a broker just restarted, the
        #: worker's next ``serve`` is under a second away): held briefly, bounded
        self._waiting: deque[tuple[float, bytes, bytes]] = deque()

    def serving(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.worker is not None and now - self.worker_seen < WORKER_TIMEOUT

    def drain(self, now: float) -> None:
        sock, stats = self.broker.cmd, self.broker.stats
        for _ in range(_DRAIN):
            try:
                ident, *frames = fr.recv_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames and frames[0] == WORKER:
                self._from_worker(ident, frames, now)
                continue
            if len(frames) != 1:
                self.broker._refuse("bad_command", f"command message with {len(frames)} frames")
                continue
            stats["commands"] += 1
            if not self.serving(now):
                if len(self._waiting) >= _MAX_WAITING:
                    self._no_worker(ident, frames[0])
                else:
                    self._waiting.append((now + WORKER_TIMEOUT, ident, frames[0]))
                continue
            assert self.worker is not None
            sock.send_multipart([self.worker, ident, frames[0]])

    def expire(self, now: float) -> None:
        """Answer the held commands whose wait for a worker is over (called every tick)."""
        while self._waiting and (self._waiting[0][0] <= now or self.serving(now)):
            _deadline, ident, body = self._waiting.popleft()
            if self.serving(now):
                assert self.worker is not None
                self.broker.cmd.send_multipart([self.worker, ident, body])
            else:
                self._no_worker(ident, body)

    def _no_worker(self, ident: bytes, body: bytes) -> None:
        self.broker.cmd.send_multipart([ident, fr.pack({
            "id": _request_id(body), "ok": False, "error_type": "BusBroken",
            "message": "no `flowbus up` serves commands on this bus (is it running?)", "args": []})])

    def _from_worker(self, ident: bytes, frames: list[bytes], now: float) -> None:
        kind = frames[1] if len(frames) > 1 else b""
        if kind == SERVE and len(frames) == 3:
            try:
                body = fr.unpack(frames[2])
                proof = body.get("proof", b"") if isinstance(body, dict) else b""
            except msgspec.DecodeError:
                proof = b""
            key = self.broker._grant_key
            if key is not None and not (isinstance(proof, bytes) and hmac.compare_digest(proof, worker_proof(key))):
                self.broker._refuse("bad_worker", "a command worker without the bus's grant key")
                return
            if self.worker != ident:
                log.info("broker.commands.worker", previous=self.worker is not None)
            self.worker, self.worker_seen = ident, now
            self.expire(now)
        elif kind == REPLY and len(frames) == 4 and ident == self.worker:
            self.worker_seen = now
            self.broker.cmd.send_multipart([frames[2], frames[3]])
        else:
            self.broker._refuse("bad_worker", "a command worker message that is not ours")


def _request_id(body: bytes) -> Any:
    try:
        req = fr.unpack(body)
    except msgspec.DecodeError:
        return None
    return req.get("id") if isinstance(req, dict) else None


# -- the worker (in `flowbus up`) -----------------------------------------------------------------


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return str(obj)


encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def error_reply(rid: Any, exc: BaseException) -> dict[str, Any]:
    """A failure as a reply: the nearest flowbus class of ``exc`` (Ray's dual ``RayTaskError(X)``
    classes included) by name, its one-line message and its arguments."""
    ours = set(all_error_types())
    cls = next((c for c in type(exc).__mro__ if c in ours), type(exc))
    message = str(exc) if cls is type(exc) else str(cls.__str__(exc))
    return {"id": rid, "ok": False, "error_type": cls.__name__,
            "message": message.strip().splitlines()[-1] if message.strip() else cls.__name__,
            "args": [a if _plain(a) else str(a) for a in exc.args]}


def _plain(value: Any) -> bool:
    """Arguments that travel as they are (str, numbers, lists of them); others as their str."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value)


class CommandServer:
    """Serves the broker's commands with ``handler(request) -> result`` in a small thread pool
    (a slow command does not hold up the others). ``handler`` raises FlowbusError for failures the
    caller should see as ours; anything else is reported by type name and message."""

    def __init__(self, endpoint: str, handler: Callable[..., Any], *, curve: ClientCurve | None = None,
                 grant_key: bytes | None = None, workers: int = 16) -> None:
        self.endpoint, self.handler, self.curve = endpoint, handler, curve
        #: a handler taking a second argument gets ``extend(seconds)``: it tells the caller, before
        #: a long command, to wait that long (the operation's own bound) instead of its own limit
        self._takes_extend = len(inspect.signature(handler).parameters) >= 2
        self._proof = worker_proof(grant_key)
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="flowbus-command")
        self._out: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self._closed = threading.Event()
        self.served = 0
        self._thread = threading.Thread(target=self._loop, name="flowbus-command-server", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        sock = connect_dealer(self._ctx, self.endpoint, self.curve)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_fd, zmq.POLLIN)
        next_serve = 0.0
        try:
            while not self._closed.is_set():
                now = time.monotonic()
                if now >= next_serve:
                    sock.send_multipart([WORKER, SERVE, fr.pack({"proof": self._proof})])
                    next_serve = now + SERVE_EVERY
                ready = dict(poller.poll(int(SERVE_EVERY * 1000)))
                if self._wake_fd in ready:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                while True:
                    try:
                        sock.send_multipart(self._out.get_nowait())
                    except queue.Empty:
                        break
                if sock in ready:
                    for _ in range(_DRAIN):
                        try:
                            frames = fr.recv_message(sock, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) == 2:
                            self._pool.submit(self._serve, frames[0], frames[1])
        except zmq.ZMQError as exc:
            if not self._closed.is_set():
                log.error("commands.server.failed", error=str(exc))
        finally:
            sock.close(0)

    def _serve(self, client: bytes, body: bytes) -> None:
        rid: Any = None
        try:
            req = fr.unpack(body)
            if not isinstance(req, dict):
                raise FlowbusError("a command is a msgpack map")
            rid = req.get("id")
            if self._takes_extend:
                def extend(seconds: float) -> None:
                    self._send(client, encoder.encode({"id": rid, "ok": True, "extend": float(seconds)}))

                result = self.handler(req, extend)
            else:
                result = self.handler(req)
            data = encoder.encode({"id": rid, "ok": True, "result": result})
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as one line
            data = encoder.encode(error_reply(rid, exc))
        self.served += 1
        self._send(client, data)

    def _send(self, client: bytes, data: bytes) -> None:
        self._out.put([WORKER, REPLY, client, data])
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        os.eventfd_write(self._wake_fd, 1)
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_fd)
        self._ctx.destroy(linger=0)


