"""The broker's on-disk journal as segments: ``journal.000001``, ``journal.000002``, ...

Each segment is a journal file in the format of :mod:`._journal` (header, checksummed records).
Appends go to the newest segment; once it holds ``segment_bytes`` (or, with an age limit, once
it is a quarter of that limit old) it is closed and the next one started (rotation). When all
segments together pass ``max_bytes``, or the oldest closed segment was closed more than
``max_age_hours`` ago, the oldest closed segments are dropped: first what
they hold that is still needed (each source's sequence base, the latest state of every slot that
was not forgotten, the tombstones) is written as one *snapshot segment* that takes the number of
the newest dropped segment (a temporary file renamed over it), then the older ones are deleted.
The events of a dropped segment leave the disk (the broker's memory ring keeps them until it
restarts); a reload reads the segments in number order, so each source's ring starts after its
base and stays gapless, and the snapshot loses nothing.

A directory holding the single-file journal of earlier versions (``journal.log``) is loaded
first and rewritten as a segment. Damage is handled per segment as in :mod:`._journal`: the span
is reported naming the segment file and the offset in it, quarantined to ``journal.damaged``, and
the records after it are kept (the journal is then rewritten clean).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flowbus.schemas import decode

from ._journal import Journal
from ._records import _ENCODER, _HEADER_BYTES, _Event, _frame, _Record, _Register
from ._tombstones import forgotten_key

log = structlog.get_logger("flowbus.journal")

_NAME = re.compile(r"journal\.(\d{6,})")
_LEGACY = "journal.log"
_NEVER = 1 << 62


def segment_name(number: int) -> str:
    """The file name of segment ``number``."""
    return f"journal.{number:06d}"


@dataclass
class Segment:
    """One segment file as the journal tracks it."""

    number: int
    path: Path
    size: int = 0
    #: when it was closed (time.time()); None for the segment being written
    closed: float | None = None
    #: when it was opened (or, for the segment written after a reload, loaded)
    opened: float = field(default_factory=time.time)
    #: only a snapshot (no ring events): never dropped on its own
    snapshot: bool = False
    #: source -> the seq of its first ring event in this segment
    first: dict[str, int] = field(default_factory=dict)


class SegmentedJournal(Journal):
    """A :class:`Journal` whose file is a directory of segments (see the module docstring).

    ``compact_bytes`` is the total limit (``bus.journal-max-bytes``), ``segment_bytes`` the size
    at which a segment is closed, ``max_age_hours`` (0 = none) the age past which a closed segment
    is dropped. Limits are checked after each flush. The fsync policy (``bus.journal-fsync``)
    applies to the segment being written; a segment is synced when it is closed (unless the
    policy is ``none``), and snapshot and compacted segments are synced before they are renamed in.
    """

    def __init__(self, capacity: int = 200_000, directory: str | os.PathLike[str] | None = None,
                 compact_bytes: int = 256 * 1024 * 1024, forgotten_kept: int = 10_000,
                 segment_bytes: int = 64 * 1024 * 1024, max_age_hours: float = 0.0, fsync: str = "none",
                 fsync_interval: float = 1.0) -> None:
        self.max_bytes = max(1, compact_bytes)
        self.segment_bytes = max(1, min(segment_bytes, self.max_bytes))
        self.max_age_hours = max(0.0, max_age_hours)
        self.segments: list[Segment] = []
        self.dropped_segments = 0  # since the broker started
        self._loading: Segment | None = None
        #: at load: (file index, offset) of each source's last record, the files' damage so far
        #: (damage after a source's last record is bridged by its first record in a later segment)
        self._file = 0
        self._where: dict[str, tuple[int, int]] = {}
        self._earlier: list[tuple[int, dict[str, Any]]] = []
        super().__init__(capacity, directory, _NEVER, forgotten_kept, fsync=fsync, fsync_interval=fsync_interval)
        self._compact_bytes = _NEVER  # the base class never compacts on its own: segments do
        if self.segments:
            cur = self.segments[-1]
            cur.size = os.fstat(self._fd).st_size if self._fd is not None else cur.size
            cur.closed = None

    # -- loading ---------------------------------------------------------------------------------

    def _load(self) -> None:
        assert self._path is not None
        folder = self._path.parent
        numbered = sorted((int(m.group(1)), p) for p in folder.iterdir()
                          if (m := _NAME.fullmatch(p.name)) and p.is_file())
        damaged: list[dict[str, Any]] = []
        torn = 0
        legacy = folder / _LEGACY
        for tmp in folder.glob("journal.*.tmp"):  # a drop or compaction cut short: the rename never came
            tmp.unlink(missing_ok=True)
        files = ([(0, legacy)] if legacy.exists() else []) + numbered
        for number, path in files:
            seg = Segment(number, path, closed=path.stat().st_mtime)
            self._loading = seg
            self._path = path
            self.damaged = []
            self._last_off = dict.fromkeys(self.sources, -1)  # a source continues from the previous file
            self._file += 1
            self.torn_bytes = 0
            super()._load()
            if self.torn_bytes and path != files[-1][1]:
                # a closed segment never ends mid-record (rotation follows a complete write): its
                # cut-off tail is damage, which the next segment's records may bridge
                self.damaged.append({"path": str(path), "offset": path.stat().st_size, "length": self.torn_bytes,
                                     "source": None, "seq": None, "reason": "torn"})
                log.warning("journal.record.damaged", **self.damaged[-1])
                self._rewrite = True
            self._earlier += [(self._file, d) for d in self.damaged]
            damaged += self.damaged
            torn += self.torn_bytes if path == files[-1][1] else 0
            seg.size = path.stat().st_size if path.exists() else 0
            seg.snapshot = not seg.first  # no ring events: a snapshot segment
            if number:
                self.segments.append(seg)
            else:
                self._rewrite = True  # the single file becomes segments
        self._loading = None
        self.damaged, self.torn_bytes = damaged, torn
        if not self.segments:
            self.segments.append(Segment(1, folder / segment_name(1)))
        self._path = self.segments[-1].path
        if len(files) > 1:
            log.info("journal.segments.loaded", path=str(folder), segments=len(self.segments),
                     bytes=sum(s.size for s in self.segments), events=len(self))

    def _apply(self, rec: _Record, off: int) -> None:
        log_ = self.sources.get(rec.source)
        if isinstance(rec, _Event) and log_ is not None and rec.seq <= log_.last_seq:
            if not rec.stateful and (gone := forgotten_key(rec.source, rec.topic)) is not None:
                # a tombstone a snapshot segment kept
                self.tombstones.forget(self.snapshot, rec.source, gone, rec.topic, rec.payload, rec.seq)
                return
        elif isinstance(rec, _Event) and self._loading is not None:
            self._loading.first.setdefault(rec.source, rec.seq)
        super()._apply(rec, off)
        self._where[rec.source] = (self._file, off)

    def _bridge(self, log_: Any, last: int, off: int, epoch: int, seen: bool = True) -> None:
        """As the base class; on a source's first record in a segment, the damage in earlier
        segments after that source's last record counts as evidence too."""
        after = self._where.get(log_.source, (0, -1))
        carried = [] if after[0] == self._file else [
            d for f, d in self._earlier if (f, d["offset"]) > after and d["source"] in (None, log_.source)]
        if not carried:
            super()._bridge(log_, last, off, epoch, seen)
            return
        here, current = self.damaged, self._path
        # the filler events name the first damaged file and offset
        self.damaged = carried + [d for d in here if d["offset"] < off]
        self._path = Path(carried[0]["path"])
        try:
            super()._bridge(log_, last, _NEVER, epoch, seen=False)
        finally:
            self.damaged, self._path = here, current

    # -- writing ---------------------------------------------------------------------------------

    def append(self, log_: Any, seq: int, topic: str, stateful: bool, payload: bytes,
               key: str | None = None) -> None:
        super().append(log_, seq, topic, stateful, payload, key)
        self._began(log_.source, seq)

    def append_frame(self, log_: Any, first: int, topics: Sequence[str], stateful: bytes,
                     payloads: Sequence[bytes], joined: str | None = None) -> None:
        super().append_frame(log_, first, topics, stateful, payloads, joined)
        if payloads:
            self._began(log_.source, first)

    def _began(self, source: str, seq: int) -> None:
        """The newest segment holds events of ``source`` from ``seq`` on (unless it held some already)."""
        if self._fd is not None:
            cur = self.segments[-1]
            cur.first.setdefault(source, seq)
            cur.snapshot = False

    def flush(self) -> None:
        """Write what was appended to the newest segment, then rotate and drop as the limits say."""
        if self._fd is None:
            return
        super().flush()
        cur = self.segments[-1]
        cur.size = os.fstat(self._fd).st_size
        # with an age limit, a segment that fills slowly is closed after a quarter of it, so
        # nothing stays on disk much longer than the limit
        aged = self.max_age_hours and time.time() - cur.opened > self.max_age_hours * 900
        if cur.size >= self.segment_bytes or (aged and cur.first):
            self._rotate()
        self._enforce()

    def file_bytes(self) -> int:
        """The size of all segments together (0 when in memory only)."""
        if self._fd is None:
            return 0
        self.segments[-1].size = os.fstat(self._fd).st_size
        return sum(s.size for s in self.segments)

    def segment_stats(self) -> dict[str, Any]:
        """Segments on disk: count, bytes, the limits, and how many were dropped (``flowbus stats``)."""
        total = self.file_bytes()
        return {"count": len(self.segments) if self._fd is not None else 0, "bytes": total,
                "segment_bytes": self.segment_bytes, "max_bytes": self.max_bytes,
                "max_age_hours": self.max_age_hours, "dropped": self.dropped_segments,
                "files": [s.path.name for s in self.segments] if self._fd is not None else []}

    def _rotate(self) -> None:
        assert self._fd is not None
        cur = self.segments[-1]
        if self._unsynced and self.fsync != "none":
            self._sync()  # a closed segment is synced whole before the next one takes the appends
        os.close(self._fd)
        cur.closed = time.time()
        nxt = Segment(cur.number + 1, cur.path.with_name(segment_name(cur.number + 1)))
        self.segments.append(nxt)
        self._path = nxt.path
        self._fd = self._open(nxt.path)
        nxt.size = os.fstat(self._fd).st_size
        log.info("journal.segment.rotated", closed=cur.path.name, bytes=cur.size, next=nxt.path.name)

    def _enforce(self) -> None:
        """Drop the oldest closed segments while over the total size or past the age limit."""
        closed = self.segments[:-1]
        total = sum(s.size for s in self.segments)
        horizon = time.time() - self.max_age_hours * 3600 if self.max_age_hours else None
        victims: list[Segment] = []
        for seg in closed:
            over = total > self.max_bytes
            old = horizon is not None and seg.closed is not None and seg.closed < horizon
            if not (over or old or seg.snapshot):
                break
            victims.append(seg)
            total -= seg.size
        while victims and victims[-1].snapshot:
            victims.pop()  # a snapshot alone is rewritten as itself: only drop it with events
        if victims:
            self._drop(victims)

    def _drop(self, victims: list[Segment]) -> None:
        """Write what ``victims`` hold that is still needed as one snapshot segment (numbered as
        the newest of them), then delete the others."""
        kept = self.segments[len(victims):]
        first: dict[str, int] = {}
        for seg in kept:
            for src, seq in seg.first.items():
                first[src] = min(first.get(src, seq), seq)
        cut = {s.source: first[s.source] - 1 if s.source in first else s.last_seq for s in self.sources.values()}
        target = victims[-1]
        self._write_atomically(target.path, self._snapshot_frames(cut))
        for seg in victims[:-1]:
            seg.path.unlink(missing_ok=True)
        size = target.path.stat().st_size
        self.segments = [Segment(target.number, target.path, size, target.closed, snapshot=True), *kept]
        self.dropped_segments += len(victims)
        log.info("journal.segments.dropped", segments=[s.path.name for s in victims], snapshot=target.path.name,
                 snapshot_bytes=size, bytes=sum(s.size for s in self.segments))
        if size > self.max_bytes:
            log.warning("journal.snapshot.over_limit", snapshot_bytes=size, limit=self.max_bytes)

    def _snapshot_frames(self, cut: dict[str, int]) -> Iterator[bytes]:
        """Each source's base at ``cut``, then (in seq order) the latest state of every slot and
        the tombstones at or before it."""
        yield _HEADER_BYTES
        enc = _ENCODER.encode
        for s in self.sources.values():
            yield _frame(enc(_Register(s.source, s.backend, s.epoch, cut[s.source], s.owner)))
        entries = [(seq, src, topic, True, payload) for topic, (src, seq, payload) in self.snapshot.items()
                   if src in cut and seq <= cut[src]]
        for topic, payload in self.tombstones.stones.items():
            ev = decode(payload)
            src, seq = getattr(ev, "source", ""), getattr(ev, "seq", 0)
            if src in cut and 0 < seq <= cut[src]:
                entries.append((seq, src, topic, False, payload))
        entries.sort(key=lambda e: e[0])
        for seq, src, topic, stateful, payload in entries:
            yield _frame(enc(_Event(src, self.sources[src].epoch, seq, topic, stateful, payload)))

    def _write_atomically(self, path: Path, frames: Iterator[bytes]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb", buffering=1 << 20, opener=lambda p, f: os.open(p, f, 0o600)) as fh:
            os.fchmod(fh.fileno(), 0o600)
            for frame in frames:
                fh.write(frame)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def compact(self) -> None:
        """Rewrite everything the journal holds (registrations, snapshot, rings) as the newest
        segment and delete every older one (after damage, for the old single file, on request)."""
        if self._path is None or self._fd is None:
            return
        cur = self.segments[-1]
        self._write_atomically(cur.path, self._compacted())
        self._pending.clear()  # the new segment holds everything appended so far
        for seg in self.segments[:-1]:
            seg.path.unlink(missing_ok=True)
        legacy = cur.path.with_name(_LEGACY)
        if legacy.exists():
            legacy.unlink()
        os.close(self._fd)
        self._fd = self._open(cur.path)
        self._unsynced = False  # the rewritten segment was synced before it was renamed in
        size = os.fstat(self._fd).st_size
        self.segments = [Segment(cur.number, cur.path, size,
                                 first={s.source: s.oldest for s in self.sources.values() if s.ring})]
        self._compacted_bytes = size
        log.info("journal.compacted", path=str(cur.path), bytes=size)


__all__ = ["Segment", "SegmentedJournal", "segment_name"]
