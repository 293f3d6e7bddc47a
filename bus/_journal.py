"""The broker's journal: a bounded in-memory ring per source, the latest-state snapshot, and an
optional append-only file that lets a restarted broker come back with both.

File records are msgpack arrays, written with one ``os.write`` per drained batch, before the
publisher is acknowledged:
``[0, source, epoch, seq, topic, stateful, payload]`` an event;
``[1, source, backend, epoch, last_seq]`` a registration (epochs survive restarts).
A torn last record (the broker died mid-write) is cut off at load.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import msgpack
import structlog

log = structlog.get_logger("flowbus.journal")

_EVENT = 0
_SOURCE = 1


@dataclass
class SourceLog:
    """What the journal knows about one source."""

    source: str
    backend: str = ""
    epoch: int = 0
    last_seq: int = 0
    ring: deque[tuple[int, str, bytes]] = field(default_factory=deque)

    @property
    def oldest(self) -> int:
        """Oldest seq still in memory (``last_seq + 1`` when the ring is empty)."""
        return self.ring[0][0] if self.ring else self.last_seq + 1


class Journal:
    """Per-source rings bounded by ``capacity`` events in total, plus the snapshot."""

    def __init__(self, capacity: int = 200_000, directory: str | os.PathLike[str] | None = None,
                 compact_bytes: int = 256 * 1024 * 1024) -> None:
        self.capacity = max(1, capacity)
        self.sources: dict[str, SourceLog] = {}
        #: topic -> (source, seq, payload) of the latest stateful event per slot
        self.snapshot: dict[str, tuple[str, int, bytes]] = {}
        self._order: deque[SourceLog] = deque()  # eviction order: one entry per ring entry
        self._size = 0
        self._pending: list[bytes] = []
        self._fd: int | None = None
        self._path: Path | None = None
        self._compact_bytes = compact_bytes
        self._packer = msgpack.Packer(use_bin_type=True)
        if directory:
            self._path = Path(directory).expanduser() / "journal.log"
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._load()
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    # -- writing ---------------------------------------------------------------------------------

    def source(self, name: str) -> SourceLog | None:
        return self.sources.get(name)

    def register(self, name: str, backend: str, epoch: int, last_seq: int) -> SourceLog:
        """Record a source's (new) epoch and sequence base."""
        log_ = self.sources.get(name)
        if log_ is None:
            log_ = self.sources[name] = SourceLog(name, backend)
        log_.backend = backend or log_.backend
        log_.epoch = epoch
        log_.last_seq = max(log_.last_seq, last_seq)
        if self._fd is not None:
            self._pending.append(self._packer.pack([_SOURCE, name, log_.backend, epoch, log_.last_seq]))
        return log_

    def append(self, log_: SourceLog, seq: int, topic: str, stateful: bool, payload: bytes) -> None:
        """Append the next event of a source (``seq == last_seq + 1`` is the caller's job)."""
        log_.last_seq = seq
        log_.ring.append((seq, topic, payload))
        self._order.append(log_)
        self._size += 1
        if stateful:
            self.snapshot[topic] = (log_.source, seq, payload)
        if self._size > self.capacity:
            victim = self._order.popleft()
            victim.ring.popleft()
            self._size -= 1
        if self._fd is not None:
            self._pending.append(self._packer.pack([_EVENT, log_.source, log_.epoch, seq, topic, stateful, payload]))

    def flush(self) -> None:
        """Write what was appended since the last flush (before acknowledging it)."""
        if self._fd is None or not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self._path is not None and os.fstat(self._fd).st_size > self._compact_bytes:
            self.compact()

    # -- reading ---------------------------------------------------------------------------------

    def replay(self, log_: SourceLog, first: int, last: int) -> list[tuple[int, str, bytes]]:
        """Events ``first..last`` of a source; the caller checks the range is held."""
        start = first - log_.oldest
        return list(islice(log_.ring, max(0, start), max(0, start) + (last - first + 1)))

    def __len__(self) -> int:
        return self._size

    # -- file --------------------------------------------------------------------------------------

    def _load(self) -> None:
        assert self._path is not None
        if not self._path.exists():
            return
        good = 0
        with open(self._path, "rb") as fh:
            unpacker = msgpack.Unpacker(fh, raw=False, max_buffer_size=1 << 30)
            try:
                for rec in unpacker:
                    self._apply(rec)
                    good = unpacker.tell()
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
                log.warning("journal.load.truncated", path=str(self._path), offset=good, error=str(exc))
        size = self._path.stat().st_size
        if good < size:
            log.warning("journal.load.torn_tail", path=str(self._path), kept=good, dropped=size - good)
            os.truncate(self._path, good)
        log.info("journal.loaded", path=str(self._path), sources=len(self.sources), events=self._size)

    def _apply(self, rec: list[object]) -> None:
        kind = rec[0]
        if kind == _SOURCE:
            _, name, backend, epoch, last_seq = rec
            log_ = self.sources.get(str(name)) or self.sources.setdefault(str(name), SourceLog(str(name)))
            log_.backend = str(backend)
            log_.epoch = int(epoch)  # type: ignore[call-overload]
            log_.last_seq = max(log_.last_seq, int(last_seq))  # type: ignore[call-overload]
        elif kind == _EVENT:
            _, name, epoch, seq, topic, stateful, payload = rec
            log_ = self.sources.get(str(name)) or self.sources.setdefault(str(name), SourceLog(str(name)))
            seq_i = int(seq)  # type: ignore[call-overload]
            topic_s, data = str(topic), bytes(payload)  # type: ignore[call-overload]
            if seq_i <= log_.last_seq:
                # older than the ring (a snapshot entry kept by compaction) or a duplicate
                held = self.snapshot.get(topic_s)
                if stateful and (held is None or held[1] <= seq_i):
                    self.snapshot[topic_s] = (log_.source, seq_i, data)
                return
            if seq_i != log_.last_seq + 1 and log_.ring:
                # a hole in the file: keep the ring contiguous by starting it again here
                for _ in range(len(log_.ring)):
                    log_.ring.popleft()
                self._order = deque(s for s in self._order if s is not log_)
                self._size = sum(len(s.ring) for s in self.sources.values())
            fd, self._fd = self._fd, None  # no re-writing while loading
            self.append(log_, seq_i, topic_s, bool(stateful), data)
            self._fd = fd

    def compact(self) -> None:
        """Rewrite the file as registrations + snapshot + ring, then swap it in atomically."""
        if self._path is None or self._fd is None:
            return
        tmp = self._path.with_suffix(".compact")
        in_ring = {(s.source, seq) for s in self.sources.values() for seq, _, _ in s.ring}
        with open(tmp, "wb") as fh:
            for s in self.sources.values():
                fh.write(self._packer.pack([_SOURCE, s.source, s.backend, s.epoch, s.ring[0][0] - 1 if s.ring else s.last_seq]))
            for topic, (src, seq, payload) in sorted(self.snapshot.items(), key=lambda kv: kv[1][1]):
                if (src, seq) not in in_ring:
                    fh.write(self._packer.pack([_EVENT, src, self.sources[src].epoch, seq, topic, True, payload]))
            for s in self.sources.values():
                for seq, topic, payload in s.ring:
                    fh.write(self._packer.pack([_EVENT, s.source, s.epoch, seq, topic, topic in self.snapshot and self.snapshot[topic][1] == seq, payload]))
            for s in self.sources.values():
                fh.write(self._packer.pack([_SOURCE, s.source, s.backend, s.epoch, s.last_seq]))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)
        os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        log.info("journal.compacted", path=str(self._path), bytes=self._path.stat().st_size)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
