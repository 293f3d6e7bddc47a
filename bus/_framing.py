"""The bus wire format, in one place. No other module builds or parses frames.

Three sockets on the broker, all bound, everyone else connects:

* ingest (ROUTER; publishers connect a DEALER). A message is ``[kind, body]``, body msgpack:
  - ``R`` register ``[source, backend, claimed_epoch, last_acked, last_sent(, grant)]``: a
    flowbus session's source carries its grant ``[owner, mac]`` (see ``_grant``)
  - ``D`` data ``[source, epoch, first_seq, [payload, ...], [topic, ...], stateful]``:
    payloads are encoded events; the index after them (per event its topic, and one byte per
    event, non-zero when it is stateful) lets the broker journal the frame without decoding an
    event. Frames without the index (older publishers) are decoded event by event.
  - ``H`` heartbeat ``[[source, epoch, last_sent], ...]``
  - ``U`` unregister ``[source, epoch]``
  and back from the broker:
  - ``W`` welcome ``[source, epoch, resume_from, broker_id]``
  - ``A`` ack ``[broker_id, [[source, epoch, acked_seq], ...]]``
  - ``N`` nack ``[source, epoch, expected_seq]`` (resend from there; -1: register again)
  - ``F`` fenced ``[source, epoch, current_epoch]``
  - ``X`` refused ``[source, code, message]``: the registration was not accepted (owned by a
    session, in use by another publisher, bad grant, out of range)
* publish (XPUB; subscribers connect a SUB). ``[topic, body]``: body is one encoded event (a
  msgpack map) or a batch (a msgpack array of encoded events) that the broker decoded and
  checked itself (its own events, frames without an index). ``[topic, header, body]``: events of
  a publisher's indexed frame, forwarded undecoded, with the broker's ``header``
  ``[source, backend, epoch, first_seq]`` (from the registration it holds, never the publisher's
  claim): the subscriber, which decodes them anyway, checks every event against it. Control
  topics start with NUL:
  ``\\0tick`` carries ``[broker_id, {source: [backend, epoch, last_seq, oldest_seq]}]`` and
  ``\\0hello/<id>`` answers a subscriber's readiness probe with ``[broker_id]``.
* request (ROUTER; clients connect a DEALER). ``[body]`` both ways, body a msgpack map with
  ``op`` and ``id``; replies carry ``id``, ``ok`` and either results or ``error``/``code``.
"""

from __future__ import annotations

from typing import Any

import msgspec

REGISTER = b"R"
DATA = b"D"
HEARTBEAT = b"H"
UNREGISTER = b"U"
WELCOME = b"W"
ACK = b"A"
NACK = b"N"
FENCED = b"F"
REFUSED = b"X"

TICK = b"\x00tick"
HELLO = b"\x00hello/"
CONTROL = b"\x00"

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()

pack = _enc.encode


def unpack(data: bytes) -> Any:
    """Decode a control body (raises ``msgspec.DecodeError``)."""
    try:
        return _dec.decode(data)
    except RecursionError as exc:  # nested too deep: still just a bad frame
        raise msgspec.DecodeError(f"msgpack nested too deep: {exc}") from None


class DataFrame(msgspec.Struct, array_like=True, frozen=True):
    source: str
    epoch: int
    first_seq: int
    payloads: list[bytes]
    #: the index (None in frames of older publishers): per event its topic ...
    topics: list[str] | None = None
    #: ... and one byte, non-zero when it is stateful
    stateful: bytes = b""


_data_dec = msgspec.msgpack.Decoder(DataFrame)


def pack_data(source: str, epoch: int, first_seq: int, payloads: list[bytes] | tuple[bytes, ...],
              topics: list[str] | tuple[str, ...] | None = None, stateful: bytes = b"") -> bytes:
    """A data frame; with ``topics`` (and ``stateful``) it carries the index."""
    if topics is None:
        return _enc.encode(DataFrame(source, epoch, first_seq, payloads))  # type: ignore[arg-type]
    return _enc.encode(DataFrame(source, epoch, first_seq, payloads, topics, stateful))  # type: ignore[arg-type]


def pack_header(source: str, backend: str, epoch: int, first_seq: int) -> bytes:
    """The broker's header on a forwarded frame (see the module docstring)."""
    return _enc.encode((source, backend, epoch, first_seq))


def unpack_data(body: bytes) -> DataFrame:
    try:
        return _data_dec.decode(body)
    except RecursionError as exc:
        raise msgspec.DecodeError(f"msgpack nested too deep: {exc}") from None


def recv_message(sock: Any, flags: int = 0) -> list[bytes]:
    """All frames of one message. ``Frame.more`` instead of the ``rcvmore`` property, which costs
    about 2 us per read in pyzmq 27 (measured by bench/bus.py's profile)."""
    frame = sock.recv(flags, copy=False)
    out = [frame.bytes]
    while frame.more:
        frame = sock.recv(copy=False)
        out.append(frame.bytes)
    return out


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items (a batch is this + the encoded events)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def is_batch(body: bytes) -> bool:
    """True when a publish-socket body is an array (a batch) rather than one event (a map)."""
    if not body:
        return False
    b = body[0]
    return 0x90 <= b <= 0x9F or b in (0xDC, 0xDD)
