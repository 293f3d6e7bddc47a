"""A source's in-memory ring of events, kept as whole frames.

A publisher's data frame is journaled as one entry ``(first_seq, topics, payloads)``, so
appending a frame of any size is a constant amount of Python work; the broker's own events and
events that went through the per-event path are frames of one. Iteration, indexing and
:meth:`FrameRing.between` slice per event (replay, compaction); eviction trims the oldest frame,
so the ring holds exactly the journal's capacity.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Sequence
from operator import itemgetter

Chunk = tuple[int, Sequence[str], Sequence[bytes]]
_FIRST = itemgetter(0)


class FrameRing:
    """Gapless events ``oldest .. newest`` of one source, in frames (see the module docstring)."""

    __slots__ = ("_chunks", "_n")

    def __init__(self) -> None:
        self._chunks: deque[Chunk] = deque()
        self._n = 0

    def add(self, first: int, topics: Sequence[str], payloads: Sequence[bytes]) -> None:
        """Append a frame of events ``first``, ``first + 1``, ... (the caller keeps them gapless).
        Kept as tuples: a tuple of strings is left alone by the garbage collector once it has
        seen it, where a list is scanned at every full collection (a ring of 200,000 one-event
        frames held as lists stalled the broker for about a second per full collection)."""
        self._chunks.append((first, tuple(topics), tuple(payloads)))
        self._n += len(payloads)

    def append(self, item: tuple[int, str, bytes]) -> None:
        """Append one event ``(seq, topic, payload)``."""
        self.add(item[0], (item[1],), (item[2],))

    def drop_head(self, most: int) -> tuple[int, bool]:
        """Drop up to ``most`` of the oldest events, from the oldest frame only; returns how many
        were dropped and whether that frame is gone."""
        first, topics, payloads = self._chunks[0]
        n = len(payloads)
        if n <= most:
            self._chunks.popleft()
            self._n -= n
            return n, True
        self._chunks[0] = (first + most, topics[most:], payloads[most:])
        self._n -= most
        return most, False

    def popleft(self) -> tuple[int, str, bytes]:
        """Remove and return the oldest event."""
        head = self[0]
        self.drop_head(1)
        return head

    def clear(self) -> None:
        self._chunks.clear()
        self._n = 0

    def first_seq(self) -> int | None:
        return self._chunks[0][0] if self._chunks else None

    def frames(self) -> int:
        return len(self._chunks)

    def between(self, first: int, last: int) -> list[tuple[int, str, bytes]]:
        """Events ``first .. last`` held (a range partly outside the ring gives what is inside)."""
        chunks = self._chunks
        out: list[tuple[int, str, bytes]] = []
        if not chunks or last < first:
            return out
        i = max(0, bisect_right(chunks, first, key=_FIRST) - 1)
        while i < len(chunks):
            f, topics, payloads = chunks[i]
            if f > last:
                break
            lo, hi = max(0, first - f), min(len(payloads), last - f + 1)
            if lo < hi:
                out.extend(zip(range(f + lo, f + hi), topics[lo:hi], payloads[lo:hi], strict=True))
            i += 1
        return out

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[tuple[int, str, bytes]]:
        for f, topics, payloads in self._chunks:
            yield from zip(range(f, f + len(payloads)), topics, payloads, strict=True)

    def __getitem__(self, i: int) -> tuple[int, str, bytes]:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("ring index out of range")
        base = self._chunks[0][0]
        got = self.between(base + i, base + i)
        return got[0]

    def __repr__(self) -> str:
        return f"FrameRing({self._n} events in {len(self._chunks)} frames)"


__all__ = ["FrameRing"]
