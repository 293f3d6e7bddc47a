"""The broker's fan-out: what it journaled goes to the publish socket, whole frames when it can.

A publisher's indexed data frame is a :class:`Run`: its payloads are joined behind an array
header (one C call, no event decoded) and sent as ``[prefix, header, body]`` with the broker's
header, which the subscriber checks every event against. Single events the broker decoded
itself (its own events, frames without an index) are gathered into frames of up to
:data:`FANOUT_BATCH` events and sent as ``[prefix, body]``.

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
    """A contiguous run of one source's events from a publisher's indexed frame, not decoded by
    the broker: forwarded with the broker's header (``_framing.pack_header``) so the subscriber
    checks each event against the source, backend, epoch and seqs the broker vouches for."""

    __slots__ = ("backend", "epoch", "first", "payloads", "source", "topics")

    def __init__(self, source: str, backend: str, epoch: int, first: int, topics: Sequence[str],
                 payloads: Sequence[bytes]) -> None:
        self.source, self.backend, self.epoch, self.first = source, backend, epoch, first
        self.topics = topics
        self.payloads = payloads


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
        #: source prefix -> True when no subscription is narrower than it (cleared by :meth:`resubscribed`)
        self._wide: dict[str, bool] = {}

    def resubscribed(self) -> None:
        """The subscription set changed: the batching decisions are made again."""
        self._wide.clear()

    def send(self, items: list[Item]) -> None:
        """Send ``items`` in order: runs of one source that follow each other joined (frames of
        ``batch_max=1`` publishers go out in batches too), single events gathered into batches."""
        singles: list[tuple[str, bytes]] = []
        run: Run | None = None
        for item in items:
            if isinstance(item, Run):
                if singles:
                    self._singles(singles)
                    singles = []
                if run is None:
                    run = item
                elif (item.source == run.source and item.epoch == run.epoch
                      and item.first == run.first + len(run.payloads) and len(run.payloads) < FANOUT_BATCH):
                    # new lists: the journal's ring holds the frames' own
                    run = Run(run.source, run.backend, run.epoch, run.first, [*run.topics, *item.topics],
                              [*run.payloads, *item.payloads])
                else:
                    self._run(run)
                    run = item
            else:
                if run is not None:
                    self._run(run)
                    run = None
                singles.append(item)
        if run is not None:
            self._run(run)
        if singles:
            self._singles(singles)

    def _run(self, run: Run) -> None:
        n, send = len(run.payloads), self.sock.send
        for i in range(0, n, FANOUT_BATCH):
            topics = run.topics[i:i + FANOUT_BATCH] if n > FANOUT_BATCH else run.topics
            payloads = run.payloads[i:i + FANOUT_BATCH] if n > FANOUT_BATCH else run.payloads
            lcp = self._run_prefix(run, topics) if len(topics) > 1 else None
            if lcp is not None:
                send(lcp.encode(), zmq.SNDMORE)
                send(fr.pack_header(run.source, run.backend, run.epoch, run.first + i), zmq.SNDMORE)
                send(fr.array_header(len(payloads)) + b"".join(payloads))
            else:  # one by one, each under its own topic, each with the header
                for j, (topic, payload) in enumerate(zip(topics, payloads, strict=True)):
                    send(topic.encode(), zmq.SNDMORE)
                    send(fr.pack_header(run.source, run.backend, run.epoch, run.first + i + j), zmq.SNDMORE)
                    send(payload)
            self._count(len(payloads))

    def _run_prefix(self, run: Run, topics: Sequence[str]) -> str | None:
        """A run's topic prefix: the source's ``<backend>/<source>/`` while no subscription is
        narrower than that (the usual case, decided once per source), else the common prefix."""
        base = f"{run.backend}/{run.source}/"
        wide = self._wide.get(base)
        if wide is None:
            wide = self._wide[base] = not any(len(p) > len(base) and p.startswith(base) for p in self.subs)
        return base if wide else self._prefix(topics)

    def _prefix(self, topics: Sequence[str]) -> str | None:
        """The common prefix of ``topics`` when no subscription is narrower than it, else None."""
        lcp = os.path.commonprefix(topics)  # noqa: RUF071 - by character, as ZMQ matches topics
        if any(len(p) > len(lcp) and p.startswith(lcp) for p in self.subs):
            return None
        return lcp

    def _singles(self, items: list[tuple[str, bytes]]) -> None:
        for i in range(0, len(items), FANOUT_BATCH):
            chunk = items[i:i + FANOUT_BATCH]
            if len(chunk) > 1 and self._batch([t for t, _ in chunk], chunk):
                continue
            send = self.sock.send
            for topic, payload in chunk:
                send(topic.encode(), zmq.SNDMORE)
                send(payload)
            self._count(len(chunk))

    def _batch(self, topics: list[str], items: list[tuple[str, bytes]]) -> bool:
        """Send ``items`` as one frame under their common prefix; False when a narrower
        subscription forbids it (nothing sent)."""
        lcp = self._prefix(topics)
        if lcp is None:
            return False
        self.sock.send(lcp.encode(), zmq.SNDMORE)
        self.sock.send(fr.array_header(len(items)) + b"".join(p for _, p in items))
        self._count(len(topics))
        return True

    def _count(self, n: int) -> None:
        self.stats["published"] += n
        if self.on_sent is not None:
            self.on_sent(n)


__all__ = ["FANOUT_BATCH", "Fanout", "Item", "Run"]
