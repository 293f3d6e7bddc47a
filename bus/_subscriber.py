"""Subscribers: typed events from the broker, gap-free per source, without duplicates.

Per source the subscriber keeps ``confirmed`` (every matching event up to this seq has been
delivered) and the seqs delivered above it. A jump in seq on a source the subscription covers
whole is a gap: it is replayed from the journal at once. Where the prefixes cover a source only
in part, seq jumps are normal, so each broker tick (which names every source's last seq) is
checked instead: anything matching between ``confirmed`` and the tick is asked for, filtered by
the same prefixes, at the broker. Events the journal no longer holds are reported (statistics
and a ``SubscriberLagged`` event), then the source's latest state is fetched from the snapshot.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import structlog
import zmq

from flowbus.schemas import (
    BusBroken,
    BusClosed,
    BusRequestError,
    Event,
    SchemaError,
    SubscriberLagged,
    decode,
    decode_many,
    reason_of,
)

from . import _framing as fr
from ._curve import ClientCurve
from ._request import Requester, broker_info, same_host
from ._verify import decode_run, describe, invalid, mismatches, replay_ok, snapshot_events

log = structlog.get_logger("flowbus.subscriber")

#: the counters statistics() always lists (a zero is a fact too)
_COUNTERS = ("broker_restarts", "delivered", "dropped", "duplicates", "fenced", "forged", "gaps", "received",
             "replay_failures", "replayed", "snapshot", "ticks", "ticks_missed")

Start = Literal["live", "snapshot", "journal"]
#: events decoded ahead of the application at most (then they are handed out; the rest waits in the socket)
_HAND_OUT = 1000


class Subscriber:
    """Events whose topic starts with one of ``prefixes``; iterate, or call :meth:`recv`.

    ``start``: ``live`` (only what happens from now on), ``snapshot`` (first the latest state of
    every matching resource, then live), ``journal`` (everything the journal still holds, then
    live). Not thread-safe: use one subscriber per thread.
    """

    def __init__(self, address: str, prefixes: str | Sequence[str] = "", *, start: Start = "live",
                 curve: ClientCurve | None = None, timeout: float = 5.0, rcvhwm: int = 100_000,
                 replay_limit: int = 10_000) -> None:
        self.address = address
        self.prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes) or ("",)
        self.timeout = timeout
        self.replay_limit = replay_limit
        self.stats: Counter[str] = Counter()
        self.broker_id = ""
        self.last_tick = 0.0
        self._tick_no: int | None = None  # the broker's last tick number we saw (None: no base yet)
        #: marks asked for after a missed tick, with the broker's tick number when it answered:
        #: acted on at the first tick after that one (see ``_handle``)
        self._deferred: tuple[int, dict[str, Any]] | None = None
        self.heartbeat_interval = 0.2
        self._out: deque[Event] = deque()
        self._confirmed: dict[str, int] = {}
        self._seen: dict[str, set[int]] = {}
        self._backend: dict[str, str] = {}
        self._full: dict[str, bool] = {}
        #: per source, the highest incarnation seen: a live event of a lower one comes from a
        #: fenced (moved, partitioned) session and is dropped, counted under ``fenced``
        self._incarnation: dict[str, int] = {}
        self._logged: set[str] = set()
        self._closed = False
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        info = broker_info(self._ctx, address, curve, timeout)
        self.heartbeat_interval = float(info.get("heartbeat_interval", 0.2))
        #: a frame from the broker holds at most ``fanout_batch`` events of at most the broker's limit
        self.max_frame_bytes = int(info.get("max_frame_bytes", 4 << 20)) * int(info.get("fanout_batch", 100))
        self._req = Requester(self._ctx, address, curve, timeout)
        sock = self._sock = self._ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.rcvhwm = rcvhwm
        sock.reconnect_ivl = 20
        sock.reconnect_ivl_max = 500
        if curve is not None:
            curve.apply(sock)
        for p in self.prefixes:
            sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        sock.setsockopt(zmq.SUBSCRIBE, fr.TICK)
        hello = fr.HELLO + uuid.uuid4().hex.encode()
        sock.setsockopt(zmq.SUBSCRIBE, hello)
        sock.connect(same_host(info["publish"], address))
        try:
            self._await_hello(hello)
            self._begin(start)
        except BaseException:
            self.close()
            raise

    # -- start -----------------------------------------------------------------------------------------

    def _await_hello(self, hello: bytes) -> None:
        """Readiness: the broker answers our probe topic only once our subscriptions are live."""
        deadline = time.monotonic() + self.timeout
        early: list[list[bytes]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise BusBroken(f"subscription to the broker at {self.address} not confirmed within {self.timeout:g} s")
            frames = fr.recv_message(self._sock)
            if frames[0] == hello:
                self.broker_id = fr.unpack(frames[-1])[0]
                break
            if frames[0] != fr.TICK:
                early.append(frames)
        self._early = early

    def _begin(self, start: Start) -> None:
        if start == "snapshot":
            reply = self._req.call("snapshot", prefixes=list(self.prefixes))
            marks = reply["sources"]
            self._set_marks(marks, use_oldest=False)
            for ev in sorted(snapshot_events(reply, self._malformed), key=lambda e: (e.source, e.seq)):
                self._out.append(ev)
                self.stats["snapshot"] += 1
        else:
            marks = self._req.call("marks")["sources"]
            self._set_marks(marks, use_oldest=start == "journal")
            if start == "journal":
                self._on_marks(marks)
        for frames in self._early:
            self._handle_frames(frames)
        self._early = []

    def _set_marks(self, marks: dict[str, list[Any]], use_oldest: bool) -> None:
        for source, (backend, _epoch, last, oldest) in marks.items():
            self._backend[source] = backend
            self._confirmed[source] = oldest - 1 if use_oldest else last

    # -- receiving -------------------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when ``timeout`` seconds pass without one (None: wait forever)."""
        if not self._out and not self._wait(timeout):
            return None
        return self._out.popleft()

    def recv_many(self, timeout: float | None = None, limit: int = 10_000) -> list[Event]:
        """Every event that is ready (at most ``limit``), waiting up to ``timeout`` for the first;
        an empty list on timeout. Cheaper per event than :meth:`recv` for high rates."""
        if not self._out and not self._wait(timeout):
            return []
        out = self._out
        if len(out) <= limit:
            batch = list(out)
            out.clear()
            return batch
        return [out.popleft() for _ in range(limit)]

    def _wait(self, timeout: float | None) -> bool:
        """Receive until something is ready to hand out; False on timeout."""
        if self._closed:
            raise BusClosed("subscriber is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._out:
            if deadline is None:
                wait_ms = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait_ms = int(left * 1000) + 1
            if not self._sock.poll(wait_ms):
                continue
            out = self._out
            for _ in range(1000):  # drain what is there without blocking
                try:
                    frames = fr.recv_message(self._sock, zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle_frames(frames)
                if len(out) >= _HAND_OUT:
                    break  # hand these out first: a large backlog of live events makes every GC pass slow
        return True

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self.recv()
            if ev is not None:
                yield ev

    def pending(self) -> int:
        return len(self._out)

    def sync(self) -> None:
        """Catch up with the broker as of now: ask for every source's last seq and fill gaps."""
        self._on_marks(self._req.call("marks")["sources"])

    def _handle_frames(self, frames: list[bytes]) -> None:
        self._handle(frames[0], frames[-1] if len(frames) > 1 else b"", frames[1] if len(frames) == 3 else None)

    def _handle(self, topic: bytes, body: bytes, header: bytes | None = None) -> None:
        """One message: ``[topic, body]`` (a control topic, or events the broker decoded) or
        ``[topic, header, body]`` (a publisher's events, checked here against the header)."""
        if topic[:1] == fr.CONTROL:
            if topic == fr.TICK:
                try:
                    broker_id, marks, *rest = fr.unpack(body)
                    marks = {str(s): (str(b), int(e), int(last), int(o)) for s, (b, e, last, o) in marks.items()}
                    # [id, marks, tick number, full]; a bare [id, marks] carries every source
                    tick_no, full = (int(rest[0]), bool(rest[1])) if len(rest) >= 2 else (0, True)
                except Exception:  # noqa: BLE001 - garbage on a control topic is counted, not fatal
                    self._malformed("invalid", "tick")
                    return
                self.last_tick = time.monotonic()
                self.stats["ticks"] += 1
                changed = broker_id != self.broker_id
                if changed:
                    self.stats["broker_restarts"] += 1
                    log.info("subscriber.broker.changed", old=self.broker_id, new=broker_id)
                    self.broker_id = broker_id
                # a delta tick names only the sources that changed since the broker's previous
                # tick: after a tick we did not get (or a new broker, or none seen yet) it is not enough
                missed = not full and (changed or self._tick_no is None or tick_no != self._tick_no + 1)
                self._tick_no = tick_no
                if changed:
                    self._deferred = None
                elif self._deferred is not None and tick_no > self._deferred[0]:
                    # this tick left the broker after it answered our marks request, so whatever
                    # those marks name was sent to us before it: only what is still missing was lost
                    deferred, self._deferred = self._deferred[1], None
                    self._on_marks(deferred)
                if missed:
                    self.stats["ticks_missed"] += 1
                    try:
                        reply = self._req.call("marks")
                    except BusBroken as exc:
                        log.warning("subscriber.marks.failed", error=str(exc))
                        self._tick_no = -1  # broker numbers ticks from 1: the next delta tick asks again
                        return
                    at = reply.get("tick")
                    if isinstance(at, int) and reply.get("broker_id") == broker_id:
                        # the broker's marks as of now: events up to them may still be on their way
                        # to us on the publish socket (asking at once replayed them: spurious)
                        self._deferred = (at, reply["sources"])
                    else:  # a broker that does not number its marks: act on them now
                        marks = reply["sources"]
                self._on_marks(marks)
            return
        self.stats["received"] += 1
        if len(body) > self.max_frame_bytes:
            self._malformed("too_large", f"frame of {len(body)} bytes on {topic[:80]!r}")
            return
        try:
            if header is not None:
                events = self._checked(topic, header, body)
                if events and self._incarnation and self._stale(events[0]):
                    # the header's epoch is every event's (checked): an old incarnation, as a whole
                    self.stats["fenced"] += len(events) - 1
                    return
                if len(events) > 1 and self._take_run(topic, events):
                    self._seen_incarnation(events[-1])
                    return
                for ev in events:
                    self._accept(ev, replayed=False)
                return
            else:
                events = decode_many(body, topic.decode("utf-8", "replace")) if fr.is_batch(body) else [
                    decode(body, topic.decode("utf-8", "replace"))]
        except SchemaError as exc:
            self._malformed(reason_of(exc), str(exc))
            return
        if self._incarnation and any(ev.incarnation < self._incarnation.get(ev.source, 0) for ev in events):
            events = [ev for ev in events if not self._stale(ev)]
        if len(events) > 1 and self._take_run(topic, events):
            self._seen_incarnation(events[-1])
            return
        for ev in events:
            self._accept(ev, replayed=False)

    def _checked(self, topic: bytes, header: bytes, body: bytes) -> list[Event]:
        """A publisher's events as the broker forwarded them: each one checked against the
        broker's header (see ``_verify``); one that fails is refused and its slot delivered as
        an ``InvalidEvent`` error. Raises ``SchemaError`` for a header or body that is garbage."""
        try:
            source, backend, epoch, first = fr.unpack(header)
            source, backend, epoch, first = str(source), str(backend), int(epoch), int(first)
        except Exception as exc:  # noqa: BLE001 - a header that is not ours: the frame is refused
            raise SchemaError(f"invalid: broker header: {exc}", topic.decode("utf-8", "replace")) from None
        events, why = decode_run(body, fr.is_batch(body), topic.decode("utf-8", "replace"))
        bad = mismatches(events, source, backend, epoch, first)
        if not bad and (self._covers_whole(source, backend) or all(
                e is not None and e.topic().startswith(self.prefixes) for e in events)):
            return events  # type: ignore[return-value]  # no None among them (mismatches found none)
        reasons = iter(why)
        out: list[Event] = []
        for i, ev in enumerate(events):
            seq = first + i
            if i in bad:
                detail = next(reasons, "") if ev is None else describe(ev, source, seq)
                self._refused_event(source, seq, "forged" if ev is not None else detail.split(":")[0], detail)
                out.append(invalid(source, backend, epoch, seq, detail or describe(ev, source, seq)))
            elif ev is not None and not ev.topic().startswith(self.prefixes):
                # under the source, but not under what we asked for: a lie about its own topic
                self._refused_event(source, seq, "forged", f"event {ev.topic()!r} came under {topic[:80]!r}")
            elif ev is not None:
                out.append(ev)
        return out

    def _refused_event(self, source: str, seq: int, reason: str, detail: str) -> None:
        key = "forged" if reason == "forged" else f"malformed.{reason}"
        self.stats[key] += 1
        n = self.stats[key]
        if n <= 10 or n % 1000 == 0:  # every one counted; the log says the first ones, then every 1000th
            log.warning("subscriber.event.refused", source=source, seq=seq, reason=reason, refused=n,
                        detail=detail[:300])

    def _take_run(self, topic: bytes, events: list[Event]) -> bool:
        """Fast path for a batch that is the next run of one source: hand it out whole.

        Source names hold no ``/``, so a batch topic that covers ``<backend>/<source>/`` proves
        every event is of that source; the broker sends a source's events in seq order, so first
        and last seq tell the run is contiguous."""
        first, last = events[0], events[-1]
        src = first.source
        confirmed = self._confirmed.get(src)
        if (confirmed is None or first.seq != confirmed + 1 or last.seq != confirmed + len(events)
                or self._seen.get(src) or not topic.startswith(f"{first.backend}/{src}/".encode())):
            return False
        self._out.extend(events)
        self._confirmed[src] = last.seq
        self.stats["delivered"] += len(events)
        return True

    def _decode_one(self, payload: bytes) -> Event | None:
        try:
            return decode(payload)
        except SchemaError as exc:
            self._malformed(reason_of(exc), str(exc))
            return None

    def _malformed(self, reason: str, detail: str) -> None:
        self.stats["forged" if reason == "forged" else f"malformed.{reason}"] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("subscriber.frame.dropped", reason=reason, detail=detail[:300])

    # -- ordering, gaps, duplicates --------------------------------------------------------------------

    def _covers_whole(self, source: str, backend: str) -> bool:
        full = self._full.get(source)
        if full is None:
            base = f"{backend}/{source}/"
            full = self._full[source] = any(base.startswith(p) for p in self.prefixes)
        return full

    def _relevant(self, source: str, backend: str) -> bool:
        base = f"{backend}/{source}/"
        return any(base.startswith(p) or p.startswith(base) for p in self.prefixes)

    def _stale(self, ev: Event) -> bool:
        """A live event older than the newest incarnation seen for its source. (The journal's
        replays and snapshots are not checked: it holds only what the broker accepted, and an
        old incarnation's accepted events stay valid history.)"""
        if ev.incarnation >= self._incarnation.get(ev.source, 0):
            return False
        self.stats["fenced"] += 1
        log.warning("subscriber.event.fenced", source=ev.source, seq=ev.seq, incarnation=ev.incarnation,
                    newest=self._incarnation[ev.source])
        return True

    def _seen_incarnation(self, ev: Event) -> None:
        if ev.incarnation > self._incarnation.get(ev.source, 0):
            self._incarnation[ev.source] = ev.incarnation

    def _accept(self, ev: Event, replayed: bool) -> None:
        self._seen_incarnation(ev)
        src, seq = ev.source, ev.seq
        confirmed = self._confirmed.get(src)
        if confirmed is not None and seq == confirmed + 1 and not self._seen.get(src):
            # the common case: the next event of a source, nothing held above it
            self._confirmed[src] = seq
            self._out.append(ev)
            self.stats["replayed" if replayed else "delivered"] += 1
            return
        if confirmed is None:
            self._backend.setdefault(src, ev.backend)
            confirmed = self._confirmed[src] = 0
        seen = self._seen.get(src)
        if seen is None:
            seen = self._seen[src] = set()
        if seq <= confirmed or seq in seen:
            self.stats["duplicates"] += 1
            return
        if not replayed and seq > confirmed + 1 and self._covers_whole(src, ev.backend) and not seen:
            self.stats["gaps"] += 1
            self._fill(src, confirmed + 1, seq - 1)
            confirmed = self._confirmed[src]
            if seq <= confirmed or seq in seen:
                self.stats["duplicates"] += 1
                return
        self._out.append(ev)
        self.stats["replayed" if replayed else "delivered"] += 1
        seen.add(seq)
        while confirmed + 1 in seen:
            confirmed += 1
            seen.discard(confirmed)
        self._confirmed[src] = confirmed

    def _on_marks(self, marks: dict[str, list[Any]]) -> None:
        for source, (backend, _epoch, last, _oldest) in marks.items():
            self._backend.setdefault(source, backend)
            if not self._relevant(source, backend):
                continue
            if last > self._confirmed.setdefault(source, 0):
                self._fill(source, self._confirmed[source] + 1, last)

    def _fill(self, source: str, first: int, last: int) -> None:
        """Ask the journal for ``first..last`` of a source (filtered by our prefixes)."""
        start = first
        try:
            while start <= last:
                try:
                    reply = self._replay_missing(source, start, last)
                except BusRequestError as exc:
                    if "[evicted]" not in str(exc) and "[bad_range]" not in str(exc):
                        raise
                    # only what the journal no longer holds is lost; replay the rest as usual
                    held = self._oldest(source) if "[evicted]" in str(exc) else None
                    upto = held - 1 if held is not None and start < held <= last else last
                    self._lagged(source, start, upto, str(exc))
                    start = upto + 1
                    continue
                seqs = reply.get("seqs") or [None] * len(reply["events"])
                for payload, seq in zip(reply["events"], seqs, strict=False):
                    ev = self._decode_one(payload)
                    if ev is not None and not replay_ok(ev, source, seq, self.prefixes):
                        self._refused_event(source, seq or ev.seq, "forged",
                                            f"replayed {source}#{seq}: {describe(ev, source, seq or 0)}")
                        ev = None if seq is None else invalid(source, self._backend.get(source, ""), ev.incarnation,
                                                              seq, describe(ev, source, seq))
                    if ev is not None:
                        self._accept(ev, replayed=True)
                start = int(reply["through"]) + 1
        except BusBroken as exc:
            self.stats["replay_failures"] += 1
            log.warning("subscriber.replay.failed", source=source, first=start, last=last, error=str(exc))
        self._advance(source, start - 1)

    def _replay_missing(self, source: str, start: int, last: int) -> dict[str, Any]:
        """One replay step. Where the subscription covers the source only in part and events of
        the range already came live, first ask which seqs match, then fetch only the missing."""
        seen = self._seen.get(source)
        args: dict[str, Any] = {"source": source, "limit": self.replay_limit, "prefixes": list(self.prefixes),
                                "to": last, "from": start}
        if not seen or self._covers_whole(source, self._backend.get(source, "")):
            return self._req.call("replay", **args)
        probe = self._req.call("replay", seqs_only=True, **args)
        through = int(probe["through"])
        missing = [q for q in probe["seqs"] if q not in seen]
        if not missing:
            return {"events": [], "seqs": [], "through": through}
        reply = self._req.call("replay", **{**args, "from": missing[0], "to": missing[-1]})
        fetched = int(reply["through"])  # the limit may have cut the fetch short: go on from there
        return {"events": reply["events"], "seqs": reply.get("seqs"),
                "through": through if fetched >= missing[-1] else fetched}

    def _oldest(self, source: str) -> int | None:
        """The oldest seq of ``source`` the broker's journal still holds (None if unknown)."""
        mark = self._req.call("marks")["sources"].get(source)
        return int(mark[3]) if mark else None

    def _advance(self, source: str, through: int) -> None:
        if through <= self._confirmed.get(source, 0):
            return
        self._confirmed[source] = through
        seen = self._seen.get(source)
        if seen:
            seen.difference_update([s for s in seen if s <= through])
            while through + 1 in seen:
                through += 1
                seen.discard(through)
            self._confirmed[source] = through

    def _lagged(self, source: str, first: int, last: int, detail: str) -> None:
        """The journal no longer holds what we missed: say so, then take the latest state."""
        lost = last - first + 1
        self.stats["dropped"] += lost
        log.warning("subscriber.lagged", source=source, first=first, last=last, detail=detail)
        self._out.append(SubscriberLagged(source=source, backend=self._backend.get(source, ""), key=source,
                                          lost=lost, first_seq=first, last_seq=last, detail=detail,
                                          time=time.time_ns()))
        try:
            reply = self._req.call("snapshot", prefixes=list(self.prefixes))
        except (BusBroken, BusRequestError):
            return
        events = snapshot_events(reply, self._malformed)
        for ev in sorted((e for e in events if e.source == source), key=lambda e: e.seq):
            if first <= ev.seq <= last:
                self._accept(ev, replayed=True)

    # -- misc ----------------------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """Counters (received, delivered, replayed, duplicates, gaps, dropped, fenced, malformed.*) and state."""
        out: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)  # every counter, zeros included
        out.update(self.stats)
        out.update(pending=len(self._out), sources=len(self._confirmed), broker_id=self.broker_id,
                   broker_alive=time.monotonic() - self.last_tick < 5 * self.heartbeat_interval + 0.5)
        return out

    def confirmed(self) -> dict[str, int]:
        return dict(self._confirmed)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(0)
        self._req.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
