"""Where events are decoded anyway, they are checked: the subscriber's side of bus trust.

The broker journals and forwards a publisher's indexed frame without decoding it (see
``_framing``); it vouches only for what it checked itself: the connection holds the source, the
epoch is current, the seq range is the next one. So every event of such a frame reaches the
subscriber with the broker's header ``[source, backend, epoch, first_seq]``, and the subscriber
checks each decoded event against it (``source``, ``backend``, ``incarnation``, ``seq``). An
event that does not match (another source's event planted in a frame, a skipped or repeated
seq, garbage bytes) is refused: counted (``forged`` / ``malformed.*``), logged with its source
and seq, and its slot is delivered as an ``ErrorEvent`` ``flowbus.bus.InvalidEvent`` naming
what was wrong, so the source's sequence stays gapless, as the broker does for frames it decodes.

Replay answers (one source, with the seqs) and snapshot answers (with each entry's topic and
seq) are checked the same way: an entry whose event is not the one the journal filed (source,
seq, topic, and for the snapshot a stateful event) is refused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import msgspec

from flowbus.schemas import ErrorEvent, Event, SchemaError, decode, decode_many, reason_of

INVALID = "flowbus.bus.InvalidEvent"
_WHO = attrgetter("source", "backend", "incarnation", "seq")
_SOURCE, _BACKEND, _INCARNATION, _SEQ = (attrgetter(a) for a in ("source", "backend", "incarnation", "seq"))
_RAW_LIST = msgspec.msgpack.Decoder(list[msgspec.Raw])


def invalid(source: str, backend: str, epoch: int, seq: int, message: str) -> ErrorEvent:
    """The event delivered in place of one that was refused."""
    return ErrorEvent(source=source, backend=backend, seq=seq, incarnation=epoch, time=time.time_ns(),
                      error_type=INVALID, message=message, operation="publish")


def decode_run(body: bytes, many: bool, topic: str) -> tuple[list[Event | None], list[str]]:
    """The events of a forwarded frame; an event that does not decode is None, with its reason
    (``not_msgpack``, ``unknown_type``, ``invalid``) in the second list (empty when all decoded).
    Raises ``SchemaError`` when the body is not even an array of msgpack items."""
    if not many:
        try:
            return [decode(body, topic)], []
        except SchemaError as exc:
            return [None], [f"{reason_of(exc)}: {exc}"]
    try:
        return list(decode_many(body, topic)), []
    except SchemaError:
        pass
    try:
        raws = _RAW_LIST.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise SchemaError(f"not_msgpack: {exc}", topic) from exc
    out: list[Event | None] = []
    why: list[str] = []
    for raw in raws:
        try:
            out.append(decode(bytes(raw), topic))
        except SchemaError as exc:
            out.append(None)
            why.append(f"{reason_of(exc)}: {exc}")
    return out, why


def mismatches(events: Sequence[Event | None], source: str, backend: str, epoch: int, first: int) -> list[int]:
    """Indexes of the events that are not ``source``'s (``backend``, ``epoch``) seqs ``first``, ``first + 1``, ..."""
    n = len(events)
    try:  # C-level: no Python per event
        if (list(map(_SEQ, events)) == list(range(first, first + n)) and list(map(_SOURCE, events)).count(source) == n
                and list(map(_BACKEND, events)).count(backend) == n
                and list(map(_INCARNATION, events)).count(epoch) == n):
            return []
    except AttributeError:  # an undecodable event (None)
        pass
    return [i for i, ev in enumerate(events) if ev is None or _WHO(ev) != (source, backend, epoch, first + i)]


def describe(ev: Event | None, source: str, seq: int) -> str:
    if ev is None:
        return f"undecodable event at {source}#{seq}"
    return (f"forged: the event says {ev.backend}/{ev.source}#{ev.seq} incarnation {ev.incarnation}, "
            f"the broker filed it as {source}#{seq}")


def replay_ok(ev: Event, source: str, seq: int | None, prefixes: tuple[str, ...]) -> bool:
    """A replayed event is the journal's entry: ``source``'s, at ``seq``, under the prefixes."""
    return ev.source == source and (seq is None or ev.seq == seq) and ev.topic().startswith(prefixes)


def snapshot_events(reply: dict[str, Any], refused: Any) -> list[Event]:
    """The events of a snapshot answer that are what the journal filed them as (topic, seq, a
    stateful event); ``refused(detail)`` is called for each other entry."""
    payloads = reply.get("events") or []
    topics: list[Any] = reply.get("topics") or [None] * len(payloads)
    seqs: list[Any] = reply.get("seqs") or [None] * len(payloads)
    out: list[Event] = []
    for payload, topic, seq in zip(payloads, topics, seqs, strict=False):
        try:
            ev = decode(payload)
        except SchemaError as exc:
            refused(reason_of(exc), f"snapshot entry {topic}: {exc}")
            continue
        if topic is not None and (ev.topic() != topic or ev.seq != seq or not ev.STATEFUL):
            refused("forged", f"snapshot entry {topic}#{seq} holds {ev.topic()}#{ev.seq} "
                              f"({type(ev).__name__}, stateful={ev.STATEFUL})")
            continue
        out.append(ev)
    return out


__all__ = ["INVALID", "decode_run", "describe", "invalid", "mismatches", "replay_ok", "snapshot_events"]
