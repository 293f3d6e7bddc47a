"""The journal file's records: header, checksummed record framing, the record kinds, and the
scanner that reads them back (damage found and skipped, see ``_journal``).

Record bodies (msgpack arrays, tagged by their first item):

* ``[0, source, epoch, seq, topic, stateful, payload]``: one event
* ``[1, source, backend, epoch, last_seq, owner]``: a registration
* ``[2, source, epoch, first_seq, topics, stateful, payloads]``: a publisher's frame of events
  ``first_seq ..`` (``stateful`` one byte per event), written as one record
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Annotated

import msgspec

_MAGIC = b"\x89FBJ\r\n\x1a\n"
_VERSION = 1
_HEADER = struct.Struct(">8sII")
_HEAD = struct.Struct(">II")  # length, crc32(body)
_MIN_BODY = 8  # the smallest body either record kind can encode to
_MIN_RECORD = _HEAD.size + _MIN_BODY
_MAX_BODY = 1 << 28
#: how every body starts: a 7-item array tagged 0 (event) or 2 (frame) or a 6-item array tagged 1
#: (registration), then the source (a msgpack str); resynchronising only tries offsets that match
_RESYNC = re.compile(rb"(?:\x97\x00|\x96\x01|\x97\x02)[\xa0-\xbf\xd9-\xdb]")
_LEGACY_FIRST = (0x95, 0x97)  # the old format starts with a 5- or 7-item array
DAMAGED_ERROR = "flowbus.bus.JournalDamaged"
#: when the file is fsynced: never by us, at most once per interval, before every ack
FSYNC_POLICIES = ("none", "interval", "always")

_U64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Event(msgspec.Struct, array_like=True, tag=0, frozen=True):
    source: str
    epoch: _U64
    seq: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    topic: str
    stateful: bool
    payload: bytes


class _Register(msgspec.Struct, array_like=True, tag=1, frozen=True):
    source: str
    backend: str
    epoch: _U64
    last_seq: _U64
    owner: str = ""  # absent from old-format records


class _Frame(msgspec.Struct, array_like=True, tag=2, frozen=True):
    source: str
    epoch: _U64
    first_seq: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    topics: list[str]
    stateful: bytes
    payloads: list[bytes]

    def __post_init__(self) -> None:
        if not self.payloads or len(self.topics) != len(self.payloads) or len(self.stateful) != len(self.payloads):
            raise ValueError("a frame record needs as many topics and stateful flags as payloads, at least one")


_Record = _Event | _Register | _Frame
_ENCODER = msgspec.msgpack.Encoder()
_DECODER: msgspec.msgpack.Decoder[_Record] = msgspec.msgpack.Decoder(_Record)
_HEADER_BYTES = _MAGIC + _VERSION.to_bytes(4, "big")
_HEADER_BYTES += zlib.crc32(_HEADER_BYTES).to_bytes(4, "big")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _frame(body: bytes) -> bytes:
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def _try(data: memoryview, pos: int) -> tuple[_Record | None, str, int]:
    """Decode the record at ``pos``: (record, "", size), or (None, reason, size or 0)."""
    if len(data) - pos < _HEAD.size:
        return None, "incomplete", 0
    length, crc = _HEAD.unpack_from(data, pos)
    end = pos + _HEAD.size + length
    if length >= _MIN_BODY and end > len(data):
        return None, "incomplete", 0  # at the end of the file: torn; before a record: "length"
    if length < _MIN_BODY or length > _MAX_BODY:
        return None, "length", 0
    body = data[pos + _HEAD.size:end]
    if zlib.crc32(body) != crc:
        return None, "crc", 0
    try:
        return _DECODER.decode(body), "", end - pos
    except msgspec.ValidationError:
        return None, "shape", end - pos  # the crc vouches for the length: skip exactly this
    except msgspec.DecodeError:
        return None, "undecodable", end - pos


def _resync(data: bytes, pos: int) -> int | None:
    """The first offset from ``pos`` on where a whole record validates."""
    view = memoryview(data)
    for m in _RESYNC.finditer(data, pos + _HEAD.size):
        if _try(view, m.start() - _HEAD.size)[0] is not None:
            return m.start() - _HEAD.size
    return None


def scan(data: bytes, pos: int = len(_HEADER_BYTES)) -> Iterator[tuple[int, int, _Record | str]]:
    """Yield ``(offset, size, record)`` for each intact record and ``(offset, size, reason)`` for
    each damaged span (reason ``"torn"`` for an incomplete tail that nothing valid follows)."""
    view = memoryview(data)
    while pos < len(data):
        rec, reason, size = _try(view, pos)
        if rec is not None or size:
            yield pos, size, rec if rec is not None else reason
            pos += size
            continue
        nxt = _resync(data, pos + 1)
        if nxt is None:
            torn = reason == "incomplete" or not data[pos:].strip(b"\0")  # zeros: a crash's prealloc
            yield pos, len(data) - pos, "torn" if torn else reason
            return
        yield pos, nxt - pos, "length" if reason == "incomplete" else reason  # it ran past a record
        pos = nxt
