"""Publishers: typed events to the broker, gapless per source, retransmitted until acknowledged.

``publish()`` is thread-safe and blocks only at a full window (``max_unacked``: back-pressure,
then ``PublishBackedUp``); it stamps the envelope, encodes and appends to the source's unacked
buffer. Then, when fewer than ``batch_max`` of the source's events are in flight, or a whole
frame (``batch_max`` events) is waiting, and the socket is free, the calling thread sends at
once (no hand-off: low latency when the bus is quiet); otherwise what queues up is sent,
coalesced into frames of up to ``batch_max`` events, when the broker's next ack comes in (the
I/O thread, woken by the socket) - a self-clocking batch that grows with the load. The socket
is shared under a lock; the I/O thread polls its file descriptor, reads acks and sends
heartbeats. The broker acks what it journaled, once per drain;
gaps are NACKed and resent; after a broker restart every source registers again and resends
what the broker does not have.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice, repeat
from typing import Any

import msgspec
import structlog
import zmq

from flowbus.schemas import BusBroken, BusClosed, Event, Fenced, PublishBackedUp, SourceRefused

from . import _framing as fr
from ._curve import ClientCurve
from ._request import broker_info, connect_dealer, same_host

log = structlog.get_logger("flowbus.publisher")
_stamp = msgspec.structs.force_setattr
_RESEND_MAX = 16  # the longest silence before a resend, in multiples of ``retransmit_after``
#: event type -> True when its topic is Event.topic's with Event.slot (``<backend>/<source>/<family>/<key>``)
_PLAIN_TOPIC: dict[type, bool] = {}


@dataclass
class _Source:
    name: str
    backend: str
    epoch: int = 0
    next_seq: int = 1
    acked: int = 0
    sent_upto: int = 0
    #: (seq, payload, topic, stateful) per event: the payload and its frame index entries
    unacked: deque[tuple[int, bytes, str, bool]] = field(default_factory=deque)
    welcome: threading.Event = field(default_factory=threading.Event)
    fenced: bool = False
    last_progress: float = 0.0
    #: seconds of silence before the next resend: ``retransmit_after``, doubled after each resend
    #: that brought no ack (a broker far behind must not get the window again every second)
    resend_after: float = 0.0
    #: the session's grant (``[owner, mac]``), sent with every registration; None for a user source
    grant: list[Any] | None = None
    #: why the broker refused this source ("" while it has not)
    refused: str = ""


class Publisher:
    """One connection to the broker's ingest socket, shared by many sources (sessions)."""

    def __init__(self, address: str, *, curve: ClientCurve | None = None, batch_max: int = 100,
                 max_unacked: int = 1_000_000, heartbeat_interval: float = 0.2, timeout: float = 5.0,
                 block_timeout: float = 60.0,
                 retransmit_after: float = 1.0, window: int = 20_000) -> None:
        self.address = address
        self.curve = curve
        self.batch_max = max(1, batch_max)
        #: events a source may hold that the broker has not acknowledged; at this mark publish()
        #: waits for acks (back-pressure) up to ``block_timeout`` s, then raises BusBroken: an
        #: event once published is never discarded
        self.max_unacked = max(1, max_unacked)
        self.block_timeout = block_timeout
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.retransmit_after = retransmit_after
        #: events sent but not yet acknowledged, per source: more waits for acks (flow control)
        self.window = max(1, window)
        self.stats: dict[str, int] = {"published": 0, "sent": 0, "resent": 0, "acked": 0, "waited": 0}
        self.broker_id = ""
        self.last_ack = 0.0
        self._sources: dict[str, _Source] = {}
        self._lock = threading.Lock()
        self._acked_cv = threading.Condition(self._lock)
        self._control: deque[list[bytes]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self._woken = False  # a wake-up is pending: publish() need not write the eventfd again
        #: the socket (set by the I/O thread once connected) and the lock whoever uses it holds
        self._sock: zmq.Socket[Any] | None = None
        self._sock_lock = threading.Lock()
        self._refusals: dict[str, str] = {}
        #: one routing id for the life of this publisher: the broker binds a source to the
        #: connection that registered it, and a reconnect keeps it (the broker hands it over)
        self._routing_id = os.urandom(16)
        self._closed = False
        self._encoder = msgspec.msgpack.Encoder()
        self._ctx: zmq.Context[Any] = zmq.Context()
        info = broker_info(self._ctx, address, curve, timeout)
        self.ingest_endpoint = same_host(info["ingest"], address)
        self._thread = threading.Thread(target=self._io_loop, name="flowbus-publisher", daemon=True)
        self._thread.start()

    # -- API ----------------------------------------------------------------------------------------

    def open_source(self, name: str, backend: str, timeout: float | None = None,
                    grant: list[Any] | None = None) -> tuple[int, int]:
        """Register a source; blocks until the broker grants an epoch. Returns (epoch, next seq).

        A source opened again in a new process (an actor restart) gets a higher epoch and
        continues the sequence the journal holds. ``grant`` is a flowbus session's source grant
        (the Supervisor makes them); a source without one is a user source, which cannot take a
        session's source nor one another live publisher holds. Raises ``SourceRefused`` naming
        why the broker said no, ``Fenced``, or ``BusBroken`` when no broker answers.
        """
        return self.open_sources([(name, backend, grant)], timeout, _strict=True)[name]

    def open_sources(self, sources: list[tuple[str, str]] | list[tuple[str, str, list[Any] | None]],
                     timeout: float | None = None, *, _strict: bool = False) -> dict[str, tuple[int, int]]:
        """:meth:`open_source` for many sources in one round (one lock, one wake-up, all
        registrations in flight together): ``(name, backend)`` or ``(name, backend, grant)``.
        Returns ``{name: (epoch, next seq)}``; a source fenced by a newer incarnation or refused
        by the broker is left out (``refusals()`` says why). Raises ``BusBroken`` when a welcome
        is missing."""
        for item in sources:
            name = item[0]
            if not name or "/" in name or name.startswith("\x00"):
                raise ValueError(f"source name {name!r}: must be non-empty, without '/' and not start with NUL")
        waiting: list[_Source] = []
        with self._lock:
            for item in sources:
                name, backend = item[0], item[1]
                grant = item[2] if len(item) > 2 else None
                src = self._sources.get(name)
                if src is None:
                    src = self._sources[name] = _Source(name, backend)
                src.grant, src.refused = grant, ""
                src.welcome.clear()
                self._reregister(src)
                waiting.append(src)
        self._wake()
        # the broker answers in order, a little per source: allow for that beyond the usual timeout
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout) + len(sources) * 0.002
        for src in waiting:
            if not src.welcome.wait(max(0.0, deadline - time.monotonic())):
                raise BusBroken(f"no welcome from the broker at {self.address} for source {src.name!r}"
                                f" ({len(sources)} sources registering)")
        refused = [s for s in waiting if s.refused]
        with self._lock:
            for s in refused:  # nothing was granted: forget it, so nothing heartbeats or publishes
                if self._sources.get(s.name) is s:
                    del self._sources[s.name]
        self._refusals.update({s.name: s.refused for s in refused})
        if _strict:
            src = waiting[0]
            if src.refused:
                raise SourceRefused(src.refused)
            if src.fenced:
                raise Fenced(f"source {src.name!r}: a newer incarnation owns it")
        return {s.name: (s.epoch, s.next_seq) for s in waiting if not s.fenced and not s.refused}

    def refusals(self) -> dict[str, str]:
        """Sources the broker refused to open, with its reason (``source 'local' belongs to ...``)."""
        return dict(self._refusals)

    def publish(self, event: Event) -> int:
        """Stamp ``seq``/``incarnation``/``time`` and queue the event; returns its seq. When the
        source holds ``max_unacked`` unacknowledged events it waits for the broker (raises
        ``PublishBackedUp``, a ``BusBroken``, after ``block_timeout`` s); nothing published is ever dropped."""
        return self.publish_many([event])[0]

    def _send_now(self) -> None:
        """Send what is pending from the calling thread if the socket is free, else leave it to
        the thread using it (woken, so nothing waits for the next ack)."""
        sock = self._sock
        if sock is None or not self._sock_lock.acquire(blocking=False):
            self._wake()
            return
        try:
            if self._sock is not None:
                self._send_pending(sock)
                if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    self._read_replies(sock)  # (the send may have taken the socket's wake-up)
        except zmq.ZMQError:
            self._wake()  # closing: the I/O thread sorts it out
        finally:
            self._sock_lock.release()

    def _wait_room_locked(self, source: str, deadline: float) -> None:
        src = self._sources.get(source)
        if src is None or len(src.unacked) < self.max_unacked:
            return
        self.stats["waited"] += 1
        while src.epoch and not src.fenced and not self._closed and len(src.unacked) >= self.max_unacked:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PublishBackedUp(f"source {source!r}: {len(src.unacked)} events not acknowledged by the broker at "
                                f"{self.address} within {self.block_timeout:g} s (publisher window full)")
            self._woken = False
            self._wake()  # the I/O thread sends what it can while we wait for acks
            self._acked_cv.wait(min(left, 0.5))

    def publish_many(self, events: list[Event]) -> list[int]:
        """:meth:`publish` for a list, under one lock; returns the seqs."""
        now = time.time_ns()
        seqs: list[int] = []
        append = seqs.append
        deadline = time.monotonic() + self.block_timeout
        encode, limit = self._encoder.encode, self.max_unacked
        name = None
        src: _Source | None = None
        with self._acked_cv:
            for event in events:
                if event.source != name or src is None:
                    name = event.source
                    src = self._sources.get(name)
                    if src is None or src.epoch == 0:
                        raise BusClosed(f"source {name!r} is not open on this publisher")
                    queue = src.unacked.append
                if len(src.unacked) >= limit:
                    self._wait_room_locked(name, deadline)
                if src.fenced:
                    raise Fenced(f"source {name!r} was fenced by a newer incarnation")
                seq = src.next_seq
                src.next_seq = seq + 1
                # a shallow copy stamped in place: ``structs.replace`` (which re-validates every
                # field) was a quarter of the publisher's CPU
                ev: Event = event.__copy__()  # type: ignore[attr-defined]  # a Struct method msgspec.Struct does not declare
                _stamp(ev, "seq", seq)
                _stamp(ev, "incarnation", src.epoch)
                if not event.time:
                    _stamp(ev, "time", now)
                cls = type(ev)
                plain = _PLAIN_TOPIC.get(cls)
                if plain is None:
                    plain = _PLAIN_TOPIC[cls] = cls.topic is Event.topic and cls.slot is Event.slot
                # Event.topic() inlined where the type keeps it (no two method calls per event)
                topic = f"{ev.backend}/{ev.source}/{ev.FAMILY}/{ev.key}" if plain else ev.topic()
                queue((seq, encode(ev), topic, ev.STATEFUL))
                append(seq)
            self.stats["published"] += len(seqs)
            # send from this thread when little is in flight (latency) or a whole frame is ready
            send_now = src is not None and (src.sent_upto - src.acked < self.batch_max
                                            or src.next_seq - 1 - src.sent_upto >= self.batch_max)
        if send_now:
            self._send_now()
        return seqs

    def flush(self, timeout: float | None = None, source: str | None = None) -> None:
        """Block until the broker has journaled everything published so far (read-your-writes)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._acked_cv:
            while True:
                pending = [s for s in self._sources.values()
                           if (source is None or s.name == source) and s.acked < s.next_seq - 1 and not s.fenced]
                if not pending:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    s = pending[0]
                    raise BusBroken(f"broker did not acknowledge source {s.name!r} up to seq {s.next_seq - 1}"
                                    f" (acked {s.acked}) in time")
                self._acked_cv.wait(left)

    def close_source(self, name: str) -> None:
        with self._lock:
            src = self._sources.pop(name, None)
            if src is not None:
                self._control.append([fr.UNREGISTER, fr.pack([name, src.epoch])])
        self._wake()

    def connected(self) -> bool:
        return time.monotonic() - self.last_ack < max(3 * self.heartbeat_interval, 1.0)

    def close(self, flush_timeout: float = 0.0, *, unregister: bool = True) -> None:
        """Close the connection. Open sources are unregistered (another publisher may open them
        at once) unless ``unregister`` is False, which leaves as a crash would: the broker then
        reports them lost after ``publisher-timeout`` and frees them for another publisher."""
        if self._closed:
            return
        if flush_timeout > 0:
            try:
                self.flush(flush_timeout)
            except BusBroken:
                log.warning("publisher.close.unflushed",
                            pending={s.name: s.next_seq - 1 - s.acked for s in self._sources.values()})
        with self._lock:  # let go of every source: another publisher may open it at once
            for src in self._sources.values() if unregister else ():
                if src.epoch and not src.fenced:
                    self._control.append([fr.UNREGISTER, fr.pack([src.name, src.epoch])])
        self._closed = True
        self._wake()
        self._thread.join(5)
        os.close(self._wake_fd)
        self._ctx.destroy(linger=0)

    # -- I/O thread -----------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (OSError, ValueError):
            pass

    def _io_loop(self) -> None:
        sock = connect_dealer(self._ctx, self.ingest_endpoint, self.curve, routing_id=self._routing_id)
        sock.sndhwm = 0  # the source's unacked buffer is the bound (max_unacked), not the socket
        sock.rcvhwm = 0
        # the socket's file descriptor, not the socket: polling it takes nothing from a calling
        # thread that sends meanwhile (edge-triggered: after each use, EVENTS says what is ready)
        poller = zmq.Poller()
        poller.register(sock.getsockopt(zmq.FD), zmq.POLLIN)
        poller.register(self._wake_fd, zmq.POLLIN)
        next_hb = 0.0
        self._sock = sock
        try:
            while not self._closed:
                ready = dict(poller.poll(max(1, int(self.heartbeat_interval * 1000 / 2))))
                if self._wake_fd in ready:
                    self._woken = False  # cleared before draining: a publish() after this wakes us again
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                with self._sock_lock:
                    while True:
                        self._read_replies(sock)
                        self._send_pending(sock)
                        now = time.monotonic()
                        if now >= next_hb:
                            self._heartbeat(sock, now)
                            next_hb = now + self.heartbeat_interval
                        if not int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                            break
        except zmq.ZMQError as exc:  # context destroyed under us at close
            if not self._closed:
                log.error("publisher.io.failed", error=str(exc))
        finally:
            with self._sock_lock:
                self._sock = None
            linger = 0
            try:
                while self._control:  # the unregistrations close() queued
                    sock.send_multipart(self._control.popleft(), zmq.NOBLOCK)
                    linger = 200
            except zmq.ZMQError:
                pass
            sock.close(linger)

    def _send_pending(self, sock: zmq.Socket[Any]) -> None:
        while self._control:
            with self._lock:
                msg = self._control.popleft()
            sock.send_multipart(msg)
        with self._lock:
            work = []
            for src in self._sources.values():
                if src.epoch == 0 or src.fenced or src.sent_upto >= src.next_seq - 1:
                    continue
                room = self.window - (src.sent_upto - src.acked)
                if room <= 0:
                    continue  # flow control: the next ack wakes us
                first = src.unacked[0][0] if src.unacked else src.next_seq
                start = max(src.sent_upto + 1, first)
                items = list(islice(src.unacked, start - first, start - first + room))
                if items:
                    work.append((src.name, f"{src.backend}/{src.name}/", src.epoch, items))
                    src.sent_upto = items[-1][0]
        for name, prefix, epoch, items in work:
            for i in range(0, len(items), self.batch_max):
                chunk = items[i:i + self.batch_max]
                _seqs, payloads, topics, stateful = zip(*chunk, strict=True)
                sock.send(fr.DATA, zmq.SNDMORE)
                if all(map(str.startswith, topics, repeat(prefix))):
                    # with the index, the broker journals and forwards the frame without decoding it
                    sock.send(fr.pack_data(name, epoch, chunk[0][0], payloads, topics, bytes(stateful)))
                else:  # an event of another backend than the source's: the broker decodes and checks each
                    sock.send(fr.pack_data(name, epoch, chunk[0][0], payloads))
            self.stats["sent"] += len(items)

    def _heartbeat(self, sock: zmq.Socket[Any], now: float) -> None:
        with self._lock:
            live = [s for s in self._sources.values() if s.epoch and not s.fenced]
            # report what was *sent*: events still queued here are not lost on the way
            beats = [[s.name, s.epoch, s.sent_upto] for s in live]
            silent = now - self.last_ack > self.retransmit_after
            for s in live:
                # the broker acknowledged nothing at all for a while although we sent: resend
                # from the ack point (a broker that is merely behind still acks something)
                wait = max(s.resend_after, self.retransmit_after)
                if s.acked < s.sent_upto and silent and now - s.last_progress > wait:
                    self.stats["resent"] += s.sent_upto - s.acked
                    s.sent_upto = s.acked
                    s.last_progress = now
                    s.resend_after = min(2 * wait, _RESEND_MAX * self.retransmit_after)
        if beats:
            sock.send_multipart([fr.HEARTBEAT, fr.pack(beats)])

    def _read_replies(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                kind, *rest = fr.recv_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            body = rest[0] if rest else b""
            try:
                self._on_reply(kind, fr.unpack(body))
            except (msgspec.DecodeError, ValueError, TypeError) as exc:
                log.warning("publisher.reply.malformed", kind=kind[:4], error=str(exc))

    def _on_reply(self, kind: bytes, body: Any) -> None:
        now = time.monotonic()
        with self._acked_cv:
            if kind == fr.ACK:
                broker_id, acks = body
                self.last_ack = now
                if self.broker_id and broker_id != self.broker_id:
                    self._reregister_all(now)
                self.broker_id = broker_id
                for name, epoch, acked in acks:
                    src = self._sources.get(name)
                    if src is None or epoch != src.epoch:
                        continue
                    if acked > src.acked:
                        src.last_progress = now
                        src.resend_after = 0.0
                    src.acked = max(src.acked, acked)
                    unacked = src.unacked
                    done = min(len(unacked), src.acked - unacked[0][0] + 1) if unacked else 0
                    if done > 0:
                        pop = unacked.popleft
                        for _ in repeat(None, done):
                            pop()
                        self.stats["acked"] += done
                    src.sent_upto = max(src.sent_upto, src.acked)
                self._acked_cv.notify_all()
            elif kind == fr.WELCOME:
                name, epoch, resume_from, broker_id = body
                src = self._sources.get(name)
                if src is None:
                    return
                self.broker_id, self.last_ack = broker_id, now
                if src.epoch != epoch:  # a new incarnation: continue the journal's sequence
                    src.epoch, src.next_seq, src.unacked = epoch, resume_from, deque()
                src.acked = resume_from - 1
                while src.unacked and src.unacked[0][0] <= src.acked:
                    src.unacked.popleft()
                src.sent_upto = src.acked
                src.last_progress = now
                src.welcome.set()
                self._acked_cv.notify_all()
            elif kind == fr.NACK:
                name, epoch, expected = body
                src = self._sources.get(name)
                if src is None or epoch != src.epoch:
                    return
                held = src.unacked[0][0] if src.unacked else src.next_seq
                if expected < 0 or expected < held:  # unknown to the broker, or a range we no longer hold
                    self._reregister(src)
                else:
                    self.stats["resent"] += max(0, src.sent_upto - expected + 1)
                    src.sent_upto = min(src.sent_upto, expected - 1)
            elif kind == fr.REFUSED:
                name, code, message = body
                src = self._sources.get(name)
                if src is not None and not src.welcome.is_set():  # an open_source() waits for this
                    src.refused = f"{message} [{code}]"
                    src.welcome.set()
                elif src is not None:
                    # a registration again (after a broker restart) that the broker no longer takes
                    log.error("publisher.source.refused", source=name, code=code, reason=message)
                    src.fenced = True
                    self._acked_cv.notify_all()
            elif kind == fr.FENCED:
                name, epoch, current = body
                src = self._sources.get(name)
                if src is not None and epoch == src.epoch:
                    src.fenced = True
                    src.welcome.set()
                    log.error("publisher.source.fenced", source=name, epoch=epoch, current_epoch=current)
                    self._acked_cv.notify_all()

    def _reregister(self, src: _Source) -> None:
        fields: list[Any] = [src.name, src.backend, src.epoch, src.acked, src.next_seq - 1]
        if src.grant is not None:
            fields.append(src.grant)
        self._control.append([fr.REGISTER, fr.pack(fields)])

    def _reregister_all(self, now: float) -> None:
        log.info("publisher.broker.restarted", address=self.address)
        for src in self._sources.values():
            if src.epoch and not src.fenced:
                self._reregister(src)
