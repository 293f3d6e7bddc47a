"""The broker's data path for one publisher's frame, once the frame's header (source, epoch, seq
range) was checked against the registration the connection holds.

* An indexed frame (``_framing.DataFrame`` with topics, stateful bytes, keys) is checked cheaply
  (index lengths, every topic under ``<backend>/<source>/``, topic sizes), journaled as one entry
  and forwarded as a :class:`~._fanout.Run`: no event is decoded here. The subscribers check the
  events against the broker's header (``_verify``).
* A frame without an index (an older publisher), or whose index is refused, is decoded event by
  event: an event that is not what the frame says becomes a typed ``ErrorEvent`` in its slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from flowbus.schemas import AnyEvent, ErrorEvent, classify, encode

from . import _framing as fr
from ._fanout import Item
from ._journal import Journal, SourceLog

#: (topics, stateful bytes, the topics joined by NUL)
Index = tuple[Sequence[str], bytes, str]


def checked_index(frame: fr.DataFrame, st: SourceLog, skip: int) -> Index | str:
    """The frame's index from event ``skip`` on, or why it is refused. Every topic must be under
    ``<backend>/<source>/`` of the registration (checked in C: the topics joined by NUL, none
    holding a NUL, every NUL followed by the prefix)."""
    n = len(frame.payloads)
    topics, stateful = frame.topics, frame.stateful
    if topics is None:
        return "no index"
    if len(topics) != n or len(stateful) != n:
        return f"index of {len(topics)} topics and {len(stateful)} flags for {n} events"
    if skip:
        topics, stateful = topics[skip:], stateful[skip:]
    prefix = f"{st.backend}/{st.source}/"
    joined = "\0".join(topics)
    if joined.count("\0") != len(topics) - 1 or ("\0" + joined).count("\0" + prefix) != len(topics):
        bad = next((t for t in topics if not t.startswith(prefix) or "\0" in t), "")
        return f"topic {bad[:100]!r} is not under {prefix!r}"
    return topics, stateful, joined


class PerEvent:
    """Decodes and checks a frame's events one by one (frames without a usable index)."""

    def __init__(self, journal: Journal, refuse: Callable[[str, str], None]) -> None:
        self.journal = journal
        self.refuse = refuse
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(AnyEvent)
        self._list_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(list[AnyEvent])

    def take(self, st: SourceLog, epoch: int, first: int, payloads: Sequence[bytes], out: list[Item]) -> None:
        source = st.source
        events: list[Any] | None = None
        if len(payloads) > 1:
            try:  # one C call for the whole frame when it is all good
                events = self._list_decoder.decode(fr.array_header(len(payloads)) + b"".join(payloads))
            except (msgspec.DecodeError, RecursionError):
                events = None  # something in it is bad: find out which, event by event
        for i, payload in enumerate(payloads):
            seq = first + i
            try:
                ev = events[i] if events is not None else self._decoder.decode(payload)
                if ev.seq != seq or ev.source != source:
                    raise ValueError(f"event says source {ev.source!r} seq {ev.seq}, frame says {source!r} seq {seq}")
                topic = ev.topic()
            except (msgspec.DecodeError, ValueError, RecursionError) as exc:
                reason = classify(payload) if isinstance(exc, (msgspec.DecodeError, RecursionError)) else "invalid"
                self.refuse(reason, f"event {source}#{seq}: {exc}")
                # keep the sequence gapless: the slot carries a typed error instead of the garbage
                ev = ErrorEvent(source=source, backend=st.backend, seq=seq, incarnation=epoch,
                                time=time.time_ns(), error_type="flowbus.bus.InvalidEvent",
                                message=f"{reason}: {exc}", operation="publish")
                payload, topic = encode(ev), ev.topic()  # noqa: PLW2901 - the slot carries the error instead
            self.journal.append(st, seq, topic, ev.STATEFUL, payload, ev.key)
            out.append((topic, payload))


__all__ = ["Index", "PerEvent", "checked_index"]
