"""Forgetting in the journal: which snapshot slots belong to which resource, and tombstones.

A session that forgets a finished resource publishes ``Forgotten`` (``<backend>/<source>/
forgotten/<key>``). The journal then drops every snapshot slot of that resource (its state and
its attributes), so the key leaves the snapshot at once and the on-disk file at the next
compaction, and keeps the ``Forgotten`` payload as a tombstone (the newest ``kept``), so a late
joiner's wait on the key learns it was forgotten instead of waiting for nothing.

The index maps ``(source, key)`` to the snapshot topics of that resource; it is built as stateful
events are journaled (the key is the event's, decoded from the payload when the caller did not
give it, e.g. while loading the file). A publisher's frame is indexed lazily: its stateful topics
go into a set with one C-level ``set.update``; before anything reads the index, each such topic
is folded in with the key of the event the snapshot holds for it (decoded then, once per topic,
not per event) and a reused key's tombstone is lifted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import msgspec

FAMILY = "forgotten"


class _Keyed(msgspec.Struct, forbid_unknown_fields=False):
    key: str = ""


_KEY = msgspec.msgpack.Decoder(_Keyed)


def forgotten_key(source: str, topic: str) -> str | None:
    """The key a ``Forgotten`` topic of ``source`` names, or None for any other topic."""
    backend, _, rest = topic.partition("/")
    head = f"{source}/{FAMILY}/"
    return rest[len(head):] if backend and rest.startswith(head) else None


class Tombstones:
    """The per-resource index of snapshot slots and the tombstones of forgotten resources."""

    def __init__(self, kept: int = 10_000, snapshot: dict[str, tuple[str, int, bytes]] | None = None) -> None:
        self.kept = max(0, kept)
        #: the journal's snapshot (topic -> (source, seq, payload)): where lazily indexed keys come from
        self.snapshot: dict[str, tuple[str, int, bytes]] = {} if snapshot is None else snapshot
        self._slots: dict[tuple[str, str], set[str]] = {}
        self._stones: OrderedDict[str, bytes] = OrderedDict()
        #: topics of stateful events journaled (by frame) but not yet in ``_slots``
        self._fresh: set[str] = set()
        #: resources forgotten since the broker started (tombstones evicted included)
        self.count = 0

    @property
    def stones(self) -> OrderedDict[str, bytes]:
        """Forgotten topic -> its payload, oldest first."""
        self._settle()
        return self._stones

    def index_many(self, topics: Iterable[str]) -> None:
        """:meth:`index` for a frame's stateful topics (now in the snapshot), folded in lazily."""
        self._fresh.update(topics)

    def _settle(self) -> None:
        if self._fresh:
            fresh, self._fresh = self._fresh, set()
            for topic in fresh:
                entry = self.snapshot.get(topic)
                if entry is not None:
                    self._index(entry[0], topic, entry[2], None)

    def index(self, source: str, topic: str, payload: bytes, key: str | None = None) -> None:
        """A stateful event of ``source`` is now the latest of ``topic``."""
        self._settle()
        self._index(source, topic, payload, key)

    def _index(self, source: str, topic: str, payload: bytes, key: str | None) -> None:
        if key is None:
            try:
                key = _KEY.decode(payload).key
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
        if key:
            self._slots.setdefault((source, key), set()).add(topic)
            if self._stones:  # a forgotten name used again: its tombstone no longer holds
                self._stones.pop(f"{topic.partition('/')[0]}/{source}/{FAMILY}/{key}", None)

    def forget(self, snapshot: dict[str, tuple[str, int, bytes]], source: str, key: str, topic: str,
               payload: bytes, seq: int) -> int:
        """Drop the resource's snapshot slots (only entries older than the tombstone, from the
        same source) and keep the tombstone; returns how many slots were dropped."""
        self._settle()
        dropped = 0
        for slot in self._slots.pop((source, key), ()):
            entry = snapshot.get(slot)
            if entry is not None and entry[0] == source and entry[1] < seq:
                del snapshot[slot]
                dropped += 1
        self.count += 1
        if self.kept:
            self._stones[topic] = payload
            self._stones.move_to_end(topic)
            while len(self._stones) > self.kept:
                self._stones.popitem(last=False)
        return dropped

    def under(self, prefixes: Iterable[str]) -> list[bytes]:
        """Tombstone payloads whose topic starts with one of ``prefixes``."""
        pre = tuple(prefixes)
        return [p for t, p in self.stones.items() if t.startswith(pre)]

    def __len__(self) -> int:
        self._settle()
        return len(self._slots)


__all__ = ["FAMILY", "Tombstones", "forgotten_key"]
