"""The broker's journal: a bounded in-memory ring per source, the latest-state snapshot, and an
optional append-only file that lets a restarted broker come back with both.

File format (version 1), all integers big-endian::

    header  b"\\x89FBJ\\r\\n\\x1a\\n" | u32 version | u32 crc32(magic + version)      (16 bytes)
    record  u32 length | u32 crc32(body) | body (``length`` bytes of msgpack)

A body is ``[0, source, epoch, seq, topic, stateful, payload]`` (an event),
``[2, source, epoch, first_seq, topics, stateful, payloads]`` (a publisher's frame: one record
for all its events) or ``[1, source, backend, epoch, last_seq, owner]`` (a registration: epochs
and owners survive restarts; see ``_records``). Records are written with one ``os.write`` per
drained batch, before the publisher is acknowledged. At load a record whose length, crc, msgpack
or shape is wrong is reported (``journal.record.damaged``, :attr:`Journal.damaged`), its bytes are copied to
``journal.damaged`` and skipped, and reading resynchronises at the next offset where a whole
record validates, so no intact record after it is lost. Events of a source lost that way are
replaced by ``flowbus.bus.JournalDamaged`` error events, so each ring stays gapless. An
incomplete last record (the broker died mid-write) is a torn tail: cut off and counted.
A file without the header (the pre-checksum format: bare msgpack arrays) is read best-effort
and rewritten in this format.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import structlog

from flowbus.schemas import BusError, ErrorEvent, encode

from ._records import (
    _ENCODER,
    _HEAD,
    _HEADER,
    _HEADER_BYTES,
    _LEGACY_FIRST,
    _MAGIC,
    _MIN_RECORD,
    _VERSION,
    DAMAGED_ERROR,
    FSYNC_POLICIES,
    _Event,
    _Frame,
    _frame,
    _Record,
    _Register,
    _try,
    _write_all,
    scan,
)
from ._ring import FrameRing
from ._tombstones import FAMILY, Tombstones, forgotten_key

log = structlog.get_logger("flowbus.journal")
_FORGOTTEN = f"/{FAMILY}/"


@dataclass
class SourceLog:
    """What the journal knows about one source."""

    source: str
    backend: str = ""
    epoch: int = 0
    last_seq: int = 0
    #: the flowbus session holding this source ("" = nobody); set by the broker at registration
    owner: str = ""
    ring: FrameRing = field(default_factory=FrameRing)

    @property
    def oldest(self) -> int:
        """Oldest seq still in memory (``last_seq + 1`` when the ring is empty)."""
        first = self.ring.first_seq()
        return self.last_seq + 1 if first is None else first


class Journal:
    """Per-source rings bounded by ``capacity`` events in total, plus the snapshot.

    After loading a file, :attr:`damaged` lists the damaged spans found (dicts with ``path``,
    ``offset``, ``length``, ``source``, ``seq``, ``reason``; ``source``/``seq`` are None when they
    cannot be inferred) and :attr:`torn_bytes` counts the bytes of a torn tail cut off.
    """

    def __init__(self, capacity: int = 200_000, directory: str | os.PathLike[str] | None = None,
                 compact_bytes: int = 256 * 1024 * 1024, forgotten_kept: int = 10_000, fsync: str = "none",
                 fsync_interval: float = 1.0) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"journal fsync policy {fsync!r}: expected one of {', '.join(FSYNC_POLICIES)}")
        self.capacity = max(1, capacity)
        #: topic -> (source, seq, payload) of the latest stateful event per slot
        self.snapshot: dict[str, tuple[str, int, bytes]] = {}
        #: snapshot slots per resource, and tombstones of forgotten resources (bus/_tombstones.py)
        self.tombstones = Tombstones(forgotten_kept, self.snapshot)
        #: ``none``, ``interval`` or ``always`` (see :meth:`flush` and :meth:`sync_due`)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        #: fsyncs done (``always``: one per flush that wrote; ``interval``: at most one per interval)
        self.fsyncs = 0
        self._unsynced = False
        self._synced_at = time.monotonic()
        self.sources: dict[str, SourceLog] = {}
        #: damaged spans found at load (see the class docstring)
        self.damaged: list[dict[str, Any]] = []
        #: bytes of an incomplete last record cut off at load
        self.torn_bytes = 0
        self._order: deque[SourceLog] = deque()  # eviction order: one entry per frame in a ring
        self._size = 0
        self._pending: list[bytes] = []
        self._fd: int | None = None
        self._path: Path | None = None
        self._compact_bytes = compact_bytes
        self._compacted_bytes = 0  # the file's size after the last compaction
        self._last_off: dict[str, int] = {}  # at load: file offset of each source's last record
        self._rewrite = False  # at load: the file needs rewriting (old format, damage)
        if directory:
            folder = Path(directory).expanduser()
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_mode & 0o077:
                try:
                    folder.chmod(0o700)
                except OSError as exc:
                    log.warning("journal.directory.insecure", path=str(folder), error=str(exc))
            self._path = folder / "journal.log"
            self._load()
            self._fd = self._open(self._path)
            if self._rewrite:
                self.compact()

    # -- writing ---------------------------------------------------------------------------------

    def source(self, name: str) -> SourceLog | None:
        """The journal's view of a source, or None if it never registered."""
        return self.sources.get(name)

    def register(self, name: str, backend: str, epoch: int, last_seq: int, owner: str = "") -> SourceLog:
        """Record a source's (new) epoch and sequence base, and its owner when one is given
        (``owner=""`` keeps the current one). A ``last_seq`` beyond what the journal holds (history
        lost) restarts the source's ring there, so the ring never has a hole."""
        log_ = self.sources.get(name)
        if log_ is None:
            log_ = self.sources[name] = SourceLog(name, backend)
        log_.backend = backend or log_.backend
        log_.owner = owner or log_.owner
        log_.epoch = epoch
        if last_seq > log_.last_seq:
            self._restart(log_, last_seq)
        if self._fd is not None:
            self._pending.append(_frame(_ENCODER.encode(
                _Register(name, log_.backend, epoch, log_.last_seq, log_.owner))))
        return log_

    def append(self, log_: SourceLog, seq: int, topic: str, stateful: bool, payload: bytes,
               key: str | None = None) -> None:
        """Append the next event of a source (``seq == last_seq + 1`` is the caller's job);
        ``key`` is the event's (decoded from the payload when not given)."""
        self._push(log_, seq, topic, stateful, payload, key)
        if self._fd is not None:
            self._pending.append(_frame(_ENCODER.encode((0, log_.source, log_.epoch, seq, topic, stateful, payload))))

    def append_frame(self, log_: SourceLog, first: int, topics: Sequence[str], stateful: bytes,
                     payloads: Sequence[bytes], joined: str | None = None) -> None:
        """Append a publisher's frame, events ``first`` .. ``first + len - 1``, as one ring entry
        and (with a file) one record. ``topics`` are under the source's prefix (the broker checked),
        ``stateful`` has one byte per event (non-zero: part of the snapshot); ``joined`` is
        ``"\\0".join(topics)`` when the caller has it. Only a frame holding a ``Forgotten`` topic
        takes the per-event path."""
        n = len(payloads)
        if not n:
            return
        source = log_.source
        if self._fd is not None:
            self._pending.append(_frame(_ENCODER.encode(
                _Frame(source, log_.epoch, first, list(topics), bytes(stateful), list(payloads)))))
        if _FORGOTTEN in (joined if joined is not None else "\0".join(topics)):
            for i in range(n):
                self._push(log_, first + i, topics[i], bool(stateful[i]), payloads[i])
            return
        log_.last_seq = first + n - 1
        log_.ring.add(first, topics, payloads)
        self._order.append(log_)
        self._size += n
        if n == 1:  # a frame of one (batch_max=1): the plain way is the cheap one
            if stateful[0]:
                self.snapshot[topics[0]] = (source, first, payloads[0])
                self.tombstones.index_many(topics)
        elif any(stateful):  # the snapshot, with C-level iteration (no Python per event)
            if stateful.count(0):
                hot = list(compress(topics, stateful))
                self.snapshot.update(zip(hot, zip(repeat(source), compress(count(first), stateful),
                                                  compress(payloads, stateful), strict=False), strict=False))
                self.tombstones.index_many(hot)
            else:
                self.snapshot.update(zip(topics, zip(repeat(source), count(first), payloads, strict=False),
                                         strict=False))
                self.tombstones.index_many(topics)
        if self._size > self.capacity:
            self._evict()

    def flush(self) -> None:
        """Write what was appended since the last flush (before acknowledging it)."""
        if self._fd is None or not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        _write_all(self._fd, data)
        self._unsynced = True
        if self.fsync == "always":
            self._sync()
        elif self.fsync == "interval":
            self.sync_due()
        if self._path is not None and os.fstat(self._fd).st_size > max(self._compact_bytes, 2 * self._compacted_bytes):
            self.compact()  # (never again at once when what it keeps is itself over the limit)

    def file_bytes(self) -> int:
        """The size of the on-disk journal (0 when in memory only)."""
        return os.fstat(self._fd).st_size if self._fd is not None else 0

    def sync_due(self) -> None:
        """With ``fsync = "interval"``: fsync what was written if the interval has passed (the
        broker calls this every tick too, so a quiet journal is synced at most an interval late)."""
        if self._unsynced and self.fsync == "interval" and time.monotonic() - self._synced_at >= self.fsync_interval:
            self._sync()

    def _sync(self) -> None:
        if self._fd is None:
            return
        os.fdatasync(self._fd)
        self.fsyncs += 1
        self._unsynced = False
        self._synced_at = time.monotonic()

    def _push(self, log_: SourceLog, seq: int, topic: str, stateful: bool, payload: bytes,
              key: str | None = None) -> None:
        log_.last_seq = seq
        log_.ring.append((seq, topic, payload))
        self._order.append(log_)
        self._size += 1
        if stateful:
            self.snapshot[topic] = (log_.source, seq, payload)
            self.tombstones.index(log_.source, topic, payload, key)
        elif (gone := forgotten_key(log_.source, topic)) is not None:
            self.tombstones.forget(self.snapshot, log_.source, gone, topic, payload, seq)
        if self._size > self.capacity:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest events until the rings hold ``capacity`` (frames trimmed, not split)."""
        order = self._order
        while self._size > self.capacity:
            dropped, gone = order[0].ring.drop_head(self._size - self.capacity)
            self._size -= dropped
            if gone:
                order.popleft()

    def _restart(self, log_: SourceLog, last_seq: int) -> None:
        """Move a source's sequence base forward to ``last_seq``, dropping the ring it had."""
        if log_.ring:
            log.warning("journal.ring.restarted", source=log_.source, dropped=len(log_.ring),
                        held_through=log_.last_seq, resumes_after=last_seq)
            self._size -= len(log_.ring)
            log_.ring.clear()
            self._order = deque(s for s in self._order if s is not log_)
        log_.last_seq = last_seq

    # -- reading ---------------------------------------------------------------------------------

    def replay(self, log_: SourceLog, first: int, last: int) -> list[tuple[int, str, bytes]]:
        """Events ``first..last`` of a source; the caller checks the range is held."""
        return log_.ring.between(first, last)

    def __len__(self) -> int:
        return self._size

    # -- loading ---------------------------------------------------------------------------------

    def _load(self) -> None:
        assert self._path is not None
        if not self._path.exists():
            return
        data = self._path.read_bytes()
        keep = len(data)  # where the file is cut (a torn tail)
        spans: list[tuple[int, int, str]] = []  # (offset, length, reason), torn tails included
        if data and not self._framed(data):
            keep = self._load_legacy(data, spans)
        elif 0 < len(data) < len(_HEADER_BYTES):
            keep = 0
            spans.append((0, len(data), "torn"))
        elif data:
            _magic, version, crc = _HEADER.unpack_from(data)
            if zlib.crc32(data[:12]) != crc:
                self._damage(0, len(_HEADER_BYTES), "header", spans)
            elif version != _VERSION:
                raise BusError(f"{self._path}: journal format version {version}, this flowbus reads "
                               f"{_VERSION}: move the file away or upgrade flowbus")
            for off, size, item in scan(data):
                if item == "torn":
                    keep = off
                    spans.append((off, size, "torn"))
                elif isinstance(item, str):
                    self._damage(off, size, item, spans, data)
                else:
                    self._apply(item, off)
        self._last_off.clear()
        self._finish_load(data, keep, spans)

    @staticmethod
    def _framed(data: bytes) -> bool:
        """True unless the file is in the old format (a magic hit by a few flips still counts)."""
        close = sum(a == b for a, b in zip(data[:8], _MAGIC, strict=False)) >= 5
        return close or data[0] not in _LEGACY_FIRST or _try(memoryview(data), len(_HEADER_BYTES))[0] is not None

    def _load_legacy(self, data: bytes, spans: list[tuple[int, int, str]]) -> int:
        """Best effort, as before checksums: read up to the first undecodable record."""
        log.info("journal.legacy.detected", path=str(self._path), bytes=len(data))
        self._rewrite = True  # in the checksummed format, once loaded
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
        unpacker.feed(data)
        good = 0
        try:
            for obj in unpacker:
                self._apply(msgspec.convert(obj, _Record), good)
                good = unpacker.tell()
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, msgspec.ValidationError,
                ValueError, TypeError) as exc:
            log.warning("journal.legacy.unreadable", path=str(self._path), offset=good, error=str(exc))
            self._damage(good, len(data) - good, "legacy", spans, data)
            return len(data)
        if good < len(data):
            spans.append((good, len(data) - good, "torn"))
        return good

    def _damage(self, offset: int, length: int, reason: str, spans: list[tuple[int, int, str]],
                data: bytes = b"") -> None:
        source: str | None = None
        seq: int | None = None
        body = data[offset + _HEAD.size:offset + length] if reason != "legacy" else data[offset:]
        try:  # what the damaged bytes claim, if that names a known source
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(body) + 1)
            unpacker.feed(body)
            raw = next(unpacker)
        except (StopIteration, ValueError, TypeError, RecursionError, msgpack.UnpackException):
            raw = None
        if isinstance(raw, list) and len(raw) > 3 and isinstance(raw[1], str) and raw[1] in self.sources:
            source = raw[1]
            seq = raw[3] if raw[0] in (0, 2) and type(raw[3]) is int else None
        spans.append((offset, length, reason))
        self.damaged.append({"path": str(self._path), "offset": offset, "length": length,
                             "source": source, "seq": seq, "reason": reason})

    def _apply(self, rec: _Record, off: int) -> None:
        if isinstance(rec, _Frame):  # a publisher's frame: its events one by one (loading is not the hot path)
            for i, (topic, st, payload) in enumerate(zip(rec.topics, rec.stateful, rec.payloads, strict=True)):
                self._apply(_Event(rec.source, rec.epoch, rec.first_seq + i, topic, bool(st), payload), off)
            return
        log_ = self.sources.get(rec.source)
        if log_ is None:
            log_ = self.sources[rec.source] = SourceLog(rec.source)
        seen = rec.source in self._last_off
        log_.epoch = max(log_.epoch, rec.epoch)
        if isinstance(rec, _Register):
            log_.backend = rec.backend or log_.backend
            log_.owner = rec.owner
            if rec.last_seq > log_.last_seq:
                if seen:
                    self._bridge(log_, rec.last_seq, off, log_.epoch)
                else:
                    log_.last_seq = rec.last_seq
            self._last_off[rec.source] = off
            return
        if not log_.backend and rec.topic.split("/", 2)[1:2] == [rec.source]:
            log_.backend = rec.topic.split("/", 1)[0]  # its registration was lost
        if rec.seq <= log_.last_seq:
            # older than the ring (a snapshot entry kept by compaction) or a duplicate
            held = self.snapshot.get(rec.topic)
            if rec.stateful and (held is None or held[1] <= rec.seq):
                self.snapshot[rec.topic] = (log_.source, rec.seq, rec.payload)
                self.tombstones.index(log_.source, rec.topic, rec.payload)
        else:
            if rec.seq > log_.last_seq + 1:
                self._bridge(log_, rec.seq - 1, off, rec.epoch, seen)
            self._push(log_, rec.seq, rec.topic, rec.stateful, rec.payload)
        self._last_off[rec.source] = off

    def _bridge(self, log_: SourceLog, last: int, off: int, epoch: int, seen: bool = True) -> None:
        """Carry a source's sequence forward to ``last`` while loading: seqs lost to damage since
        its previous record become error events, a jump no damage explains restarts the ring."""
        lo = self._last_off.get(log_.source, -1) if seen else -1
        spans = [d for d in self.damaged if lo < d["offset"] < off]
        evidence = sum(d["length"] for d in spans)
        fill = min(last - log_.last_seq, self.capacity, max(1, evidence // _MIN_RECORD) if evidence else 0)
        if fill < last - log_.last_seq:
            self._restart(log_, last - fill)
        first = log_.last_seq + 1
        for seq in range(first, last + 1):
            message = (f"journal {self._path}: the record of {log_.source}#{seq} was damaged "
                       f"near offset {spans[0]['offset']} and is lost")
            ev = ErrorEvent(source=log_.source, backend=log_.backend, seq=seq, incarnation=epoch,
                            time=time.time_ns(), error_type=DAMAGED_ERROR, message=message,
                            args=[str(self._path), str(spans[0]["offset"]), str(seq)], operation="journal")
            self._push(log_, seq, ev.topic(), False, encode(ev))
        if fill:
            log.warning("journal.gap.filled", path=str(self._path), source=log_.source, first=first, last=last)
        for i, d in enumerate(s for s in spans if s["source"] in (None, log_.source)):
            if first + i <= last:
                d["source"], d["seq"] = log_.source, first + i

    def _finish_load(self, data: bytes, keep: int, spans: list[tuple[int, int, str]]) -> None:
        assert self._path is not None
        path = str(self._path)
        for d in self.damaged:
            log.warning("journal.record.damaged", **d)
        quarantined = self._quarantine(data, spans)
        if self.damaged and quarantined:
            self._rewrite = True  # the damaged bytes are safe elsewhere: write a clean file
        if keep < len(data):
            self.torn_bytes = len(data) - keep
            log.warning("journal.tail.dropped", path=path, kept=keep, dropped=self.torn_bytes)
            os.truncate(self._path, keep)
        log.info("journal.loaded", path=path, sources=len(self.sources), events=self._size,
                 damaged=len(self.damaged), torn_bytes=self.torn_bytes)

    def _quarantine(self, data: bytes, spans: list[tuple[int, int, str]]) -> bool:
        """Append each span to ``journal.damaged``: a JSON line, the raw bytes, a newline."""
        if not spans:
            return True
        assert self._path is not None
        target = self._path.with_name("journal.damaged")
        now = time.time_ns()
        out = b"".join(json.dumps({"path": str(self._path), "offset": off, "length": n, "reason": why,
                                   "time": now}).encode() + b"\n" + data[off:off + n] + b"\n"
                       for off, n, why in spans)
        try:
            fd = self._open(target, b"")
            try:
                _write_all(fd, out)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("journal.quarantine.failed", path=str(target), error=str(exc))
            return False
        return True

    # -- file --------------------------------------------------------------------------------------

    @staticmethod
    def _open(path: Path, header: bytes = _HEADER_BYTES) -> int:
        """Open for appending, 0600; a new (or emptied) file starts with ``header``."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        if st.st_size == 0 and header:
            _write_all(fd, header)
        return fd

    def compact(self) -> None:
        """Rewrite the file as registrations + snapshot + ring, then swap it in atomically."""
        if self._path is None or self._fd is None:
            return
        tmp = self._path.with_suffix(".compact")
        with open(tmp, "wb", buffering=1 << 20, opener=lambda p, f: os.open(p, f, 0o600)) as fh:
            os.fchmod(fh.fileno(), 0o600)
            for frame in self._compacted():
                fh.write(frame)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)
        self._pending.clear()  # the new file holds everything appended so far
        dfd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.close(self._fd)
        self._fd = self._open(self._path)
        self._compacted_bytes = self._path.stat().st_size
        log.info("journal.compacted", path=str(self._path), bytes=self._compacted_bytes)

    def _compacted(self) -> Iterator[bytes]:
        """The header, each source's base, snapshot entries older than the rings, the rings, and
        each source's registration as it stands."""
        yield _HEADER_BYTES
        enc = _ENCODER.encode
        for s in self.sources.values():
            base = s.ring[0][0] - 1 if s.ring else s.last_seq
            yield _frame(enc(_Register(s.source, s.backend, s.epoch, base, s.owner)))
        # a ring is gapless, so a snapshot entry is in it when its seq is not older than the
        # ring's oldest (no set of every ring entry: compaction allocates little)
        oldest = {s.source: s.oldest for s in self.sources.values()}
        for topic, (src, seq, payload) in sorted(self.snapshot.items(), key=lambda kv: kv[1][1]):
            if seq < oldest[src]:
                yield _frame(enc(_Event(src, self.sources[src].epoch, seq, topic, True, payload)))
        for s in self.sources.values():
            for seq, topic, payload in s.ring:
                latest = self.snapshot.get(topic)
                stateful = latest is not None and latest[:2] == (s.source, seq)
                yield _frame(enc(_Event(s.source, s.epoch, seq, topic, stateful, payload)))
        for s in self.sources.values():
            yield _frame(enc(_Register(s.source, s.backend, s.epoch, s.last_seq, s.owner)))

    def close(self) -> None:
        """Flush and close the file (the in-memory journal stays readable)."""
        self.flush()
        if self._fd is not None:
            if self._unsynced and self.fsync != "none":
                self._sync()
            os.close(self._fd)
            self._fd = None
