"""The bus broker: one process, one loop, three bound sockets (see ``_framing``).

Publishers are acknowledged only after their events are in the journal (and on disk when a
journal directory is configured), so with the publishers' retransmit buffers nothing acked is
lost across a broker restart. Gaps from a publisher are NACKed; stale incarnations are fenced.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq

from flowbus.schemas import (
    BROKER_SOURCE,
    SCHEMA_VERSION,
    BusConfig,
    ConfigError,
    ErrorEvent,
    Event,
    PublisherBack,
    PublisherLost,
    classify,
    encode,
    is_loopback,
)

from . import _framing as fr
from ._commands import CommandRouter
from ._curve import READ_DOMAIN, WRITE_DOMAIN, server_setup
from ._endpoints import chmod_ipc, ipc_targets, tcp_targets
from ._fanout import FANOUT_BATCH, Fanout, Item, Run
from ._grant import check_grant, load_grant_key
from ._ingest import PerEvent, checked_index
from ._journal import SourceLog
from ._queries import Refused, held, limits, replay, snapshot
from ._segments import SegmentedJournal

log = structlog.get_logger("flowbus.broker")

_DRAIN = 2000  # messages per socket per loop turn, so one busy socket cannot starve the others
_DRAIN_EVENTS = 20_000  # events per ingest turn: acks go out at least this often
_DRAIN_SECONDS = 0.05  # and at least this often (a loaded machine: publishers resend after silence)
_NACK_EVERY = 0.2  # seconds between NACKs for the same source
#: epochs and seqs a registration may carry (msgpack and the journal hold them as 64-bit ints;
#: nothing a client sends may push them near that)
MAX_EPOCH = 2**31 - 1
MAX_SEQ = 2**53
_MAX_NAME = 128  # characters in a source or backend name
#: every this many ticks a tick carries every source's marks; the others carry only the sources
#: whose marks changed since the previous tick (a subscriber that misses a tick sees the jump in
#: the tick number and asks for all marks)
FULL_TICK_EVERY = 25
_LIVENESS = f"flowbus/{BROKER_SOURCE}/bus/liveness/"


class Broker:
    """Fan-out with topic-prefix filtering, a journal with replay and snapshot, heartbeats."""

    def __init__(self, config: BusConfig, journal_dir: str | None = None) -> None:
        self.config = config
        self.broker_id = uuid.uuid4().hex[:12]
        self.journal = SegmentedJournal(config.journal_events,
                                        journal_dir if journal_dir is not None else config.journal_dir or None,
                                        config.journal_max_bytes, config.forgotten_kept,
                                        config.journal_segment_bytes, config.journal_max_age_hours,
                                        fsync=config.journal_fsync, fsync_interval=config.journal_fsync_interval)
        self.stats: Counter[str] = Counter()
        self.endpoints: dict[str, str] = {}
        self._per_event = PerEvent(self.journal, self._refuse)
        self._subs: set[str] = set()
        self._heard: dict[str, float] = {}
        self._lost: set[str] = set()
        self._gone: set[str] = set()
        self._last_nack: dict[str, float] = {}
        self._logged: set[str] = set()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._auth: Any = None
        self._running = False
        self._own: SourceLog | None = None
        self._tick_no = 0
        self._dirty: set[str] = set()  # sources whose marks changed since the last tick
        #: source -> the ingest connection (routing id) of the incarnation that registered it; data,
        #: heartbeats and unregistrations from any other connection are not taken for it
        self._holders: dict[str, bytes] = {}
        self._grant_key: bytes | None = None
        self._commands = CommandRouter(self)

    # -- lifecycle ---------------------------------------------------------------------------------

    def bind(self) -> dict[str, str]:
        """Bind the three sockets; returns their endpoints (ports resolved when 0).

        Raises OSError when a socket cannot be bound and ConfigError for a configuration that
        would let someone else in (TCP without CurveZMQ, an ipc directory others may enter)."""
        cfg = self.config
        if cfg.transport == "tcp" and not cfg.curve.server_secret_key_file:
            if not is_loopback(cfg.host):
                raise OSError(f"refusing to bind {cfg.host!r} (not loopback) without CurveZMQ: "
                              "set bus.curve.server-secret-key-file")
            if not cfg.insecure_loopback:
                raise OSError(f"refusing to serve TCP on {cfg.host} without CurveZMQ: every local user reaches "
                              "loopback. Use bus.transport = \"ipc\" (the default), set bus.curve keys (`flowbus up` "
                              "makes them for transport = \"tcp\"), or bus.insecure-loopback = true for a "
                              "throwaway test")
        self._grant_key = load_grant_key(cfg.grant_key_file) if cfg.grant_key_file else None
        self._ctx = zmq.Context()
        try:
            self._auth = server_setup(self._ctx, cfg.curve) if cfg.transport == "tcp" else None
        except ConfigError:
            self._ctx.term()
            self._ctx = None
            raise
        self.ingest = self._ctx.socket(zmq.ROUTER)
        self.xpub = self._ctx.socket(zmq.XPUB)
        self.req = self._ctx.socket(zmq.ROUTER)
        self.cmd = self._ctx.socket(zmq.ROUTER)
        for sock in (self.ingest, self.xpub, self.req, self.cmd):
            sock.linger = 0
            # bounded: the transport refuses larger messages and stops reading a client whose
            # queue is full (back-pressure on that client, nothing dropped)
            sock.maxmsgsize = cfg.max_frame_bytes + 4096 if sock is not self.xpub else cfg.max_topic_bytes + 1
            sock.rcvhwm = cfg.queue_messages
            sock.sndhwm = 0 if sock is not self.xpub else 200_000
            if self._auth is not None:
                self._auth.apply_server(sock, WRITE_DOMAIN if sock in (self.ingest, self.cmd) else READ_DOMAIN)
        self._fan = Fanout(self.xpub, self._subs, self.stats)
        self.ingest.router_handover = True  # a publisher's reconnect keeps its routing id
        try:
            targets = ipc_targets(cfg) if cfg.transport == "ipc" else tcp_targets(cfg)
        except (OSError, ConfigError):
            self.close()
            raise
        sockets = {"request": self.req, "publish": self.xpub, "ingest": self.ingest, "command": self.cmd}
        for name, target in targets.items():
            sock = sockets[name]
            try:
                sock.bind(target)
            except zmq.ZMQError as exc:
                self.close()
                raise OSError(f"cannot bind the {name} socket on {target}: {exc.strerror or exc} "
                              "(another broker or `flowbus up` running?)") from exc
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if cfg.transport == "ipc":
            chmod_ipc(cfg, self.endpoints)
        self._own = self.journal.source(BROKER_SOURCE)
        self._own = self.journal.register(BROKER_SOURCE, "flowbus", (self._own.epoch if self._own else 0) + 1,
                                          self._own.last_seq if self._own else 0)
        self._report_damage()
        self.journal.flush()
        # a publisher the journal last knew as lost stays lost until heard (then PublisherBack
        # clears it for the snapshot's readers, as it would have without the restart)
        self._lost = {ev.key for topic in self.journal.snapshot if topic.startswith(_LIVENESS)
                      if isinstance(ev := held(self.journal, topic), PublisherLost) and ev.source == BROKER_SOURCE}
        # liveness is tracked only for sources heard by this broker: live publishers re-register
        # within one heartbeat after a broker restart, sessions of an earlier run never will
        log.info("broker.bound", broker_id=self.broker_id, **self.endpoints, grants=self._grant_key is not None,
                 curve=self._auth is not None, journal=len(self.journal), sources=len(self.journal.sources))
        return dict(self.endpoints)

    def _report_damage(self) -> None:
        """Journal records found damaged at load: one log line each (the journal's) and one
        ErrorEvent of the broker's naming the file offset, source and seq."""
        damaged = list(getattr(self.journal, "damaged", []) or [])
        if not damaged:
            return
        out: list[Item] = []
        for d in damaged[:1000]:
            where = f"{d.get('path')} offset {d.get('offset')}"
            what = f"source {d.get('source')!r} seq {d.get('seq')}" if d.get("source") else "source unknown"
            self._emit_own(ErrorEvent(source=BROKER_SOURCE, backend="flowbus", key=str(d.get("source") or ""),
                                      error_type="flowbus.bus.JournalDamaged", operation="journal",
                                      message=f"damaged journal record at {where} ({what}): {d.get('reason')}; "
                                              "skipped, the records after it were kept"), out)
        self.stats["journal_damaged"] += len(damaged)

    def run(self, should_stop: Any = None) -> None:
        """Serve until :meth:`stop` (or ``should_stop()`` returns True)."""
        assert self._ctx is not None, "bind() first"
        poller = zmq.Poller()
        for sock in (self.ingest, self.xpub, self.req, self.cmd):
            poller.register(sock, zmq.POLLIN)
        hb = self.config.heartbeat_interval
        next_tick = time.monotonic()
        self._running = True
        while self._running:
            wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            ready = dict(poller.poll(wait_ms))
            if self.xpub in ready:
                self._drain_subscriptions()
            if self.ingest in ready:
                self._drain_ingest()
            if self.req in ready:
                self._drain_requests()
            if self.cmd in ready:
                self._commands.drain(time.monotonic())
            now = time.monotonic()
            if now >= next_tick:
                self._commands.expire(now)
                self._tick(now)
                next_tick = now + hb
                if should_stop is not None and should_stop():
                    break
        self.close()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self.journal.close()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    # -- ingest --------------------------------------------------------------------------------------

    def _drain_ingest(self) -> None:
        sock = self.ingest
        acks: dict[bytes, dict[str, list[int]]] = {}
        out: list[Item] = []
        budget = _DRAIN_EVENTS
        turn_end = time.monotonic() + _DRAIN_SECONDS
        for i in range(_DRAIN):
            if budget <= 0 or (i & 31 == 31 and time.monotonic() > turn_end):
                break
            try:
                ident, *frames = fr.recv_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 2:
                self._refuse("bad_frames", f"ingest message with {len(frames)} frames after the identity")
                continue
            kind, body = frames
            if len(body) > self.config.max_frame_bytes:
                self._refuse("too_large", f"ingest frame of {len(body)} bytes > max-frame-bytes")
                continue
            try:
                if kind == fr.DATA:
                    budget -= self._on_data(ident, body, acks, out)
                elif kind == fr.HEARTBEAT:
                    self._on_heartbeat(ident, body, acks)
                elif kind == fr.REGISTER:
                    try:
                        self._on_register(ident, body)
                    except (ValueError, TypeError, OverflowError) as exc:
                        # answered, so the publisher fails at once with the reason, not a timeout
                        fields = fr.unpack(body)
                        name = fields[0] if isinstance(fields, list) and fields and isinstance(fields[0], str) else ""
                        self._refuse_source(ident, name, "invalid", f"register frame: {exc}")
                elif kind == fr.UNREGISTER:
                    self._on_unregister(ident, body)
                else:
                    self._refuse("unknown_kind", f"ingest message kind {kind[:8]!r}")
            except (msgspec.DecodeError, ValueError, TypeError, OverflowError) as exc:  # e.g. int(inf)
                self._refuse(classify(body), f"ingest {kind[:1]!r} frame: {exc}")
        if out:
            self._fanout(out)
        self.journal.flush()
        for ident, per_source in acks.items():
            body = fr.pack([self.broker_id, [[s, e, last] for s, (e, last) in per_source.items()]])
            sock.send_multipart([ident, fr.ACK, body])

    def _on_register(self, ident: bytes, body: bytes) -> None:
        """A publisher asks for a source. Everything in the frame is checked before it can touch
        the journal: names, integer ranges, the grant (a session's source), the holder."""
        fields = fr.unpack(body)
        if not isinstance(fields, list) or len(fields) not in (5, 6):
            raise ValueError("register frame: expected [source, backend, epoch, last_acked, last_sent(, grant)]")
        source, backend, claimed, last_acked, last_sent = fields[:5]
        grant = fields[5] if len(fields) == 6 else None
        if not isinstance(source, str) or not isinstance(backend, str):
            raise ValueError("register frame: source and backend must be strings")
        if source == BROKER_SOURCE:
            return self._refuse_source(ident, source, "reserved", f"source name {BROKER_SOURCE!r} is reserved")
        if (not source or "/" in source or source.startswith("\x00") or len(source) > _MAX_NAME
                or not source.isprintable() or not backend.isprintable() or len(backend) > _MAX_NAME):
            return self._refuse_source(ident, source, "bad_name",
                                       f"source name {source[:_MAX_NAME]!r} ({backend[:_MAX_NAME]!r}): "
                                       f"must be 1-{_MAX_NAME} printable characters, without '/'")
        for what, value, top in (("epoch", claimed, MAX_EPOCH), ("last acked seq", last_acked, MAX_SEQ),
                                 ("last sent seq", last_sent, MAX_SEQ)):
            if type(value) is not int or not 0 <= value <= top:
                return self._refuse_source(ident, source, "out_of_range",
                                           f"source {source!r}: {what} {value!r} is not an integer in 0..{top}")
        owner = ""
        if grant is not None:
            if self._grant_key is None:
                return self._refuse_source(ident, source, "grants_off",
                                           f"source {source!r} came with a grant, but this "
                                           "broker checks none (bus.grant-key-file is not set)")
            try:
                owner = check_grant(self._grant_key, source, backend, grant)
            except ValueError as exc:
                return self._refuse_source(ident, source, "bad_grant", str(exc))
        st = self.journal.source(source)
        if st is not None and st.owner and st.owner != owner:
            return self._refuse_source(ident, source, "owned", f"source {source!r} belongs to session {st.owner}; "
                                       "only flowbus opens it (pick another source name)")
        holder = self._holders.get(source)
        if (not owner and holder is not None and holder != ident and source not in self._lost
                and source not in self._gone):
            return self._refuse_source(ident, source, "in_use", f"source {source!r} is open on another publisher; "
                                       "it is free once that one closes it or falls silent for "
                                       f"{self.config.publisher_timeout:g} s")
        if st is None:
            # new source, or a broker that lost its journal: the publisher's incarnation stands
            st = self.journal.register(source, backend, claimed or 1, last_acked if claimed else 0, owner=owner)
        elif claimed == 0 or claimed > st.epoch:
            if st.epoch >= MAX_EPOCH:
                return self._refuse_source(ident, source, "out_of_range", f"source {source!r}: no epoch left")
            # a new incarnation (the broker grants the next epoch; it never takes one from the client)
            st = self.journal.register(source, backend, st.epoch + 1, st.last_seq, owner=owner)
        elif claimed == st.epoch:
            # same incarnation after a broker restart: it resends what the journal lacks
            if last_acked > st.last_seq:  # acked by a broker that lost it: that history is gone
                log.warning("broker.source.history_lost", source=source, first=st.last_seq + 1, last=last_acked)
                st = self.journal.register(source, backend, st.epoch, last_acked, owner=owner)
        else:
            self.stats["fenced"] += 1
            self.ingest.send_multipart([ident, fr.FENCED, fr.pack([source, claimed, st.epoch])])
            return None
        resume = st.last_seq + 1
        self.journal.flush()
        if holder is not None and holder != ident and st.epoch != claimed:
            self.stats["taken_over"] += 1
        self._holders[source] = ident
        self._dirty.add(source)
        self._gone.discard(source)
        self._heard[source] = time.monotonic()
        self.stats["registrations"] += 1
        log.info("broker.source.registered", source=source, epoch=st.epoch, resume_from=resume, owner=st.owner or None)
        self.ingest.send_multipart([ident, fr.WELCOME, fr.pack([source, st.epoch, resume, self.broker_id])])
        return None

    def _refuse_source(self, ident: bytes, source: str, code: str, message: str) -> None:
        self.stats[f"refused.{code}"] += 1
        log.warning("broker.source.refused", source=source[:_MAX_NAME], code=code, detail=message[:300])
        self.ingest.send_multipart([ident, fr.REFUSED, fr.pack([source[:_MAX_NAME], code, message])])

    def _on_unregister(self, ident: bytes, body: bytes) -> None:
        src, _epoch = fr.unpack(body)
        source = str(src)
        if self._holders.get(source) != ident:
            self.stats["foreign"] += 1
            return
        del self._holders[source]
        self._gone.add(source)
        self._heard.pop(source, None)

    def _check_epoch(self, ident: bytes, source: str, epoch: int) -> SourceLog | None:
        st = self.journal.source(source)
        if st is not None and epoch == st.epoch:
            holder = self._holders.get(source)
            if holder == ident:
                return st
            if holder is not None:
                # another connection writing a source it did not register: not taken, and
                # not answered with a fence (that would tell a stranger the incarnation)
                self._refuse("foreign",
                             f"data or heartbeat for source {source!r} from a connection that does not hold it")
                return None
        elif st is not None and epoch < st.epoch:
            self.stats["fenced"] += 1
            self.ingest.send_multipart([ident, fr.FENCED, fr.pack([source, epoch, st.epoch])])
            return None
        self._nack(ident, source, epoch, -1)  # unknown to this broker (or to this connection): register again
        return None

    def _nack(self, ident: bytes, source: str, epoch: int, expected: int) -> None:
        now = time.monotonic()
        if now - self._last_nack.get(source, 0.0) < _NACK_EVERY:
            return
        self._last_nack[source] = now
        self.stats["nacks"] += 1
        self.ingest.send_multipart([ident, fr.NACK, fr.pack([source, epoch, expected])])

    def _on_data(self, ident: bytes, body: bytes, acks: dict[bytes, dict[str, list[int]]],
                 out: list[Item]) -> int:
        """Journal a data frame's new events; returns how many events it carried. An indexed
        frame is journaled and forwarded whole, undecoded (``_ingest``)."""
        frame = fr.unpack_data(body)
        n = len(frame.payloads)
        st = self._check_epoch(ident, frame.source, frame.epoch)
        if st is None:
            return n
        source = frame.source
        self._heard[source] = time.monotonic()
        if source in self._lost:
            self._lost.discard(source)
            self._emit_own(PublisherBack(source=BROKER_SOURCE, backend="flowbus", key=source), out)
        expected = st.last_seq + 1
        if frame.first_seq > expected:
            self.stats["gaps"] += 1
            self._nack(ident, source, frame.epoch, expected)
            return n
        skip = max(0, expected - frame.first_seq)
        self.stats["duplicates"] += min(skip, n)
        if skip < n:
            first = frame.first_seq + skip
            payloads = frame.payloads[skip:] if skip else frame.payloads
            index = checked_index(frame, st, skip)
            if isinstance(index, tuple):
                topics, stateful, joined = index
                self.journal.append_frame(st, first, topics, stateful, payloads, joined)
                out.append(Run(source, st.backend, frame.epoch, first, topics, payloads))
            else:
                if frame.topics is not None:  # an index, but not one to trust: decode instead
                    self._refuse("bad_index", f"frame {source}#{first}: {index}")
                self._per_event.take(st, frame.epoch, first, payloads, out)
            self._dirty.add(source)
        self.stats["received"] += n
        acks.setdefault(ident, {})[source] = [frame.epoch, st.last_seq]
        return n

    def _on_heartbeat(self, ident: bytes, body: bytes, acks: dict[bytes, dict[str, list[int]]]) -> None:
        out: list[Item] = []
        for source, epoch, last_sent in fr.unpack(body):
            st = self._check_epoch(ident, str(source), int(epoch))
            if st is None:
                continue
            self._heard[st.source] = time.monotonic()
            if st.source in self._lost:
                self._lost.discard(st.source)
                self._emit_own(PublisherBack(source=BROKER_SOURCE, backend="flowbus", key=st.source), out)
            if int(last_sent) > st.last_seq:
                self._nack(ident, st.source, int(epoch), st.last_seq + 1)  # the tail got lost
            acks.setdefault(ident, {})[st.source] = [int(epoch), st.last_seq]
        if out:
            self._fanout(out)

    # -- fan-out -------------------------------------------------------------------------------------

    def _fanout(self, items: list[Item]) -> None:
        self._fan.send(items)

    def _emit_own(self, ev: Event, out: list[Item]) -> None:
        own = self._own
        assert own is not None
        ev = msgspec.structs.replace(ev, seq=own.last_seq + 1, incarnation=own.epoch, time=time.time_ns())
        payload = encode(ev)
        self.journal.append(own, ev.seq, ev.topic(), ev.STATEFUL, payload)
        self._dirty.add(own.source)
        out.append((ev.topic(), payload))

    def _drain_subscriptions(self) -> None:
        for _ in range(_DRAIN):
            try:
                msg = self.xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not msg:
                continue
            topic = msg[1:]
            if msg[0] == 1:
                if topic.startswith(fr.HELLO):
                    self.xpub.send_multipart([topic, fr.pack([self.broker_id])])
                elif not topic.startswith(fr.CONTROL):
                    # the transport already refuses topics over max-topic-bytes; the set the
                    # broker keeps for batching decisions is bounded too
                    if len(self._subs) < self.config.max_subscriptions:
                        self._subs.add(topic.decode("utf-8", "replace"))
                        self._fan.resubscribed()
                    else:
                        self._refuse("too_many_subscriptions", f"{len(self._subs)} distinct topics kept")
                self.stats["subscriptions"] += 1
            elif msg[0] == 0:
                self._subs.discard(topic.decode("utf-8", "replace"))
                self._fan.resubscribed()

    def _marks(self) -> dict[str, list[Any]]:
        return {s.source: [s.backend, s.epoch, s.last_seq, s.oldest] for s in self.journal.sources.values()}

    def _tick(self, now: float) -> None:
        out: list[Item] = []
        limit = self.config.publisher_timeout
        for source, heard in list(self._heard.items()):
            if source not in self._lost and source not in self._gone and now - heard > limit:
                self._lost.add(source)
                log.warning("broker.publisher.lost", source=source, silent_s=round(now - heard, 2))
                self._emit_own(PublisherLost(source=BROKER_SOURCE, backend="flowbus", key=source,
                                             silent_s=round(now - heard, 3)), out)
        if out:
            self._fanout(out)
            self.journal.flush()
        self.journal.sync_due()
        self._tick_no += 1
        full = self._tick_no % FULL_TICK_EVERY == 1 or FULL_TICK_EVERY <= 1
        if full:
            marks = self._marks()
        else:
            sources = self.journal.sources
            marks = {name: [st.backend, st.epoch, st.last_seq, st.oldest]
                     for name in self._dirty if (st := sources.get(name)) is not None}
        self._dirty.clear()
        self.stats["ticks_full" if full else "ticks_delta"] += 1
        # [broker id, marks, tick number, full]: a subscriber that sees a tick number jump (a tick
        # dropped on the way) asks for every source's marks instead of trusting the delta
        self.xpub.send_multipart([fr.TICK, fr.pack([self.broker_id, marks, self._tick_no, full])])

    # -- requests ------------------------------------------------------------------------------------

    def _drain_requests(self) -> None:
        sock = self.req
        for _ in range(_DRAIN):
            try:
                frames = fr.recv_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                break
            envelope, body = frames[:-1], frames[-1]
            rid: Any = None
            try:
                if len(body) > self.config.max_frame_bytes:
                    raise Refused("too_large", f"request of {len(body)} bytes")
                req = fr.unpack(body)
                if not isinstance(req, dict):
                    raise Refused("bad_request", "a request is a msgpack map")
                rid = req.get("id")
                reply = self._answer(req)
                reply.update(ok=True)
            except Refused as exc:
                reply = {"ok": False, "code": exc.code, "error": exc.message}
            except msgspec.DecodeError:
                reply = {"ok": False, "code": "not_msgpack", "error": "request is not msgpack"}
                self._refuse("not_msgpack", "request socket frame")
            except (TypeError, ValueError, LookupError, AttributeError, OverflowError) as exc:
                # a map with fields of the wrong type (prefixes=5, limit=inf): refuse it, keep serving
                reply = {"ok": False, "code": "bad_request", "error": f"bad request: {exc}"}
            reply["id"] = rid
            self.stats["requests"] += 1
            sock.send_multipart([*envelope, fr.pack(reply)])

    def _answer(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "info":
            return {"broker_id": self.broker_id, "schema_version": SCHEMA_VERSION, **self.endpoints,
                    "curve_server_key": self._auth.public_key.decode() if self._auth is not None else None,
                    "journal_events": len(self.journal), "heartbeat_interval": self.config.heartbeat_interval,
                    "max_frame_bytes": self.config.max_frame_bytes, "fanout_batch": FANOUT_BATCH,
                    # where this broker's grant key is (0600: only its owner can read it), so the
                    # owner's Supervisor on this machine need not be told twice; never the key itself
                    "grant_key_file": str(Path(self.config.grant_key_file).expanduser().absolute())
                    if self.config.grant_key_file else "",
                    "commands": self._commands.serving()}
        if op == "marks":
            # the tick number: a subscriber acts on these marks once a later tick arrives (sent
            # after this reply, so after every event the marks name)
            return {"sources": self._marks(), "broker_id": self.broker_id, "tick": self._tick_no}
        if op == "stats":
            return {"stats": {**self.stats, "journal_fsyncs": self.journal.fsyncs}, "subscriptions": sorted(self._subs),
                    "sources": len(self.journal.sources), "journal_events": len(self.journal),
                    "lost": sorted(self._lost), "broker_id": self.broker_id,
                    "limits": limits(self.journal, self.config, len(self._subs), len(self._heard))}
        if op == "snapshot":
            return {**snapshot(self.journal, req), "sources": self._marks(), "broker_id": self.broker_id}
        if op == "replay":
            reply = replay(self.journal, req)
            self.stats["replayed"] += len(reply.get("events", ()))
            return reply
        raise Refused("unknown_op", f"unknown request op {op!r}")

    def _refuse(self, reason: str, detail: str) -> None:
        self.stats[f"malformed.{reason}"] += 1
        if reason not in self._logged:  # one line per reason, not per frame
            self._logged.add(reason)
            log.warning("broker.frame.dropped", reason=reason, detail=detail[:300])



__all__ = ["Broker"]
