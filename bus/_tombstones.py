"""Forgetting in the journal: which snapshot slots belong to which resource, and tombstones.

A session that forgets a finished resource publishes ``Forgotten`` (``<backend>/<source>/
forgotten/<key>``). The journal then drops every snapshot slot of that resource (its state and
its attributes), so the key leaves the snapshot at once and the on-disk file at the next
compaction, and keeps the ``Forgotten`` payload as a tombstone (the newest ``kept``), so a late
joiner's wait on the key learns it was forgotten instead of waiting for nothing.

The index maps ``(source, key)`` to the snapshot topics of that resource; it is built as stateful
events are journaled (the key is the event's, decoded from the payload when the caller did not
give it, e.g. while loading the file).
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

    def __init__(self, kept: int = 10_000) -> None:
        self.kept = max(0, kept)
        self._slots: dict[tuple[str, str], set[str]] = {}
        #: Forgotten topic -> its payload, oldest first
        self.stones: OrderedDict[str, bytes] = OrderedDict()
        #: resources forgotten since the broker started (tombstones evicted included)
        self.count = 0

    def index(self, source: str, topic: str, payload: bytes, key: str | None = None) -> None:
        """A stateful event of ``source`` is now the latest of ``topic``."""
        if key is None:
            try:
                key = _KEY.decode(payload).key
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
        if key:
            self._slots.setdefault((source, key), set()).add(topic)
            if self.stones:  # a forgotten name used again: its tombstone no longer holds
                self.stones.pop(f"{topic.partition('/')[0]}/{source}/{FAMILY}/{key}", None)

    def forget(self, snapshot: dict[str, tuple[str, int, bytes]], source: str, key: str, topic: str,
               payload: bytes, seq: int) -> int:
        """Drop the resource's snapshot slots (only entries older than the tombstone, from the
        same source) and keep the tombstone; returns how many slots were dropped."""
        dropped = 0
        for slot in self._slots.pop((source, key), ()):
            entry = snapshot.get(slot)
            if entry is not None and entry[0] == source and entry[1] < seq:
                del snapshot[slot]
                dropped += 1
        self.count += 1
        if self.kept:
            self.stones[topic] = payload
            self.stones.move_to_end(topic)
            while len(self.stones) > self.kept:
                self.stones.popitem(last=False)
        return dropped

    def under(self, prefixes: Iterable[str]) -> list[bytes]:
        """Tombstone payloads whose topic starts with one of ``prefixes``."""
        pre = tuple(prefixes)
        return [p for t, p in self.stones.items() if t.startswith(pre)]

    def __len__(self) -> int:
        return len(self._slots)


__all__ = ["FAMILY", "Tombstones", "forgotten_key"]
