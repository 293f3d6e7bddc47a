"""The msgpack codec for events: encoders/decoders built once, failures classified by reason."""

from __future__ import annotations

from typing import Any

import msgspec

from ._errors import SchemaError
from ._events import TAGS, AnyEvent, Event

_ENCODER = msgspec.msgpack.Encoder()
_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(AnyEvent)
_LIST_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(list[AnyEvent])
_RAW = msgspec.msgpack.Decoder()

#: the reasons a frame is refused, used as statistics keys
REASONS = ("not_msgpack", "unknown_type", "invalid", "too_large")


def encode(event: Event) -> bytes:
    """Encode one event to msgpack (a map with a ``type`` tag)."""
    return _ENCODER.encode(event)


def encode_many(events: list[Event]) -> bytes:
    """Encode a list of events as one msgpack array."""
    return _ENCODER.encode(events)


def decode(data: bytes | memoryview, topic: str = "") -> Event:
    """Decode one event; raise :class:`SchemaError` whose ``args[1]`` is the topic."""
    try:
        return _DECODER.decode(data)  # type: ignore[no-any-return]  # msgspec: Decoder of a union
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise SchemaError(f"{classify(data)}: {exc}", topic) from exc


def decode_many(data: bytes | memoryview, topic: str = "") -> list[Event]:
    """Decode a msgpack array of events."""
    try:
        return _LIST_DECODER.decode(data)  # type: ignore[no-any-return]  # msgspec: Decoder of a union
    except (msgspec.DecodeError, RecursionError) as exc:
        raise SchemaError(f"{classify(data, many=True)}: {exc}", topic) from exc


def classify(data: bytes | memoryview, many: bool = False) -> str:
    """Why a frame failed to decode: ``not_msgpack``, ``unknown_type`` or ``invalid``."""
    try:
        raw = _RAW.decode(data)
    except msgspec.DecodeError:
        return "not_msgpack"
    except RecursionError:  # valid msgpack nested deeper than msgspec decodes: fits no event
        return "invalid"
    items = raw if many and isinstance(raw, list) else [raw]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("type"), str) and item["type"] not in TAGS:
            return "unknown_type"
    return "invalid"


def reason_of(exc: SchemaError) -> str:
    """The statistics key of a :class:`SchemaError` raised by this module."""
    head = str(exc.args[0]).split(":", 1)[0]
    return head if head in REASONS else "invalid"
