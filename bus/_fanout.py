"""The broker's fan-out: what it journaled goes to the publish socket, whole frames when it can.

A publisher's data frame that validated as a whole (one C call) is a :class:`Run`: its topics,
its payloads and the batch body the broker decoded (``array header + payloads``). That body is
forwarded unchanged under the run's common topic prefix, so the broker joins nothing again.
Single events (``batch_max=1`` publishers, the broker's own events, events of a frame that did
not validate whole) are gathered into frames of up to :data:`FANOUT_BATCH` events.

A batch goes out under the common prefix of its topics only when no subscription is narrower
than that prefix (ZeroMQ filters by prefix: a narrower subscriber would get events it did not
ask for, or miss the batch); otherwise its events go one by one.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from . import _framing as fr

#: events per frame to subscribers: large lists decode slower per event
FANOUT_BATCH = 100


class Run:
    """A contiguous run of one source's events, validated whole: forwarded as one frame."""

    __slots__ = ("body", "payloads", "topics")

    def __init__(self, topics: list[str], payloads: Sequence[bytes], body: bytes) -> None:
        self.topics = topics
        self.payloads = payloads
        #: ``array_header(len(payloads)) + b"".join(payloads)``: the bytes subscribers decode
        self.body = body


Item = tuple[str, bytes] | Run


class Fanout:
    """Sends journaled events on the publish socket, counting them under ``published``."""

    def __init__(self, sock: zmq.Socket[Any], subscriptions: set[str], stats: Counter[str],
                 on_sent: Callable[[int], None] | None = None) -> None:
        self.sock = sock
        self.subs = subscriptions
        self.stats = stats
        #: hook, called with the number of events after each frame sent
        self.on_sent = on_sent

    def send(self, items: list[Item]) -> None:
        """Send ``items`` in order: runs as they came, single events gathered into batches."""
        singles: list[tuple[str, bytes]] = []
        for item in items:
            if isinstance(item, Run):
                if singles:
                    self._singles(singles)
                    singles = []
                self._run(item)
            else:
                singles.append(item)
        if singles:
            self._singles(singles)

    def _run(self, run: Run) -> None:
        n = len(run.topics)
        if n > FANOUT_BATCH or not self._batch(run.topics, run.body):
            self._singles(list(zip(run.topics, run.payloads, strict=True)))

    def _singles(self, items: list[tuple[str, bytes]]) -> None:
        for i in range(0, len(items), FANOUT_BATCH):
            chunk = items[i:i + FANOUT_BATCH]
            if len(chunk) > 1 and self._batch([t for t, _ in chunk], None, chunk):
                continue
            send = self.sock.send
            for topic, payload in chunk:
                send(topic.encode(), zmq.SNDMORE)
                send(payload)
            self._count(len(chunk))

    def _batch(self, topics: list[str], body: bytes | None, items: list[tuple[str, bytes]] | None = None) -> bool:
        """Send ``topics``' events as one frame under their common prefix; False when a narrower
        subscription forbids it (nothing sent)."""
        lcp = os.path.commonprefix(topics)  # noqa: RUF071 - by character, as ZMQ matches topics
        if any(len(p) > len(lcp) and p.startswith(lcp) for p in self.subs):
            return False
        if body is None:
            assert items is not None
            body = fr.array_header(len(items)) + b"".join(p for _, p in items)
        self.sock.send(lcp.encode(), zmq.SNDMORE)
        self.sock.send(body)
        self._count(len(topics))
        return True

    def _count(self, n: int) -> None:
        self.stats["published"] += n
        if self.on_sent is not None:
            self.on_sent(n)


def whole_run(events: list[Any], source: str, first: int) -> bool:
    """True when ``events`` (a frame's, decoded) are ``source``'s seqs ``first``, ``first + 1``, ...:
    what the frame's header says, so the frame can be a :class:`Run`."""
    return (all(ev.source == source for ev in events)
            and [ev.seq for ev in events] == list(range(first, first + len(events))))


__all__ = ["FANOUT_BATCH", "Fanout", "Item", "Run", "whole_run"]
