"""Event types, the msgpack codec and the exception family (``flowbus.schemas``)."""

from __future__ import annotations

import enum
import inspect
import pickle
import types
import typing
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowbus.bus
from flowbus import schemas
from flowbus.schemas import (
    EVENT_TYPES,
    REASONS,
    TAGS,
    ErrorEvent,
    Event,
    LogLine,
    SchemaError,
    State,
    StateChanged,
    all_error_types,
    classify,
    decode,
    decode_many,
    encode,
    encode_many,
    reason_of,
    stamp,
    tag_of,
)

try:  # services may define more error types; the pickling test should cover them too
    import flowbus.services  # noqa: F401 - imported for the error types it defines
except ImportError:  # pragma: no cover - reported by test_exports
    pass

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

#: the wire tags; rule 3 of the schema-evolution rules says they never change
STABLE_TAGS = {
    "state": "StateChanged",
    "attr": "AttributeChanged",
    "log": "LogLine",
    "connected": "Connected",
    "disconnected": "Disconnected",
    "resynced": "Resynced",
    "heartbeat": "Heartbeat",
    "recovery.attempted": "RecoveryAttempted",
    "recovery.gave_up": "RecoveryGaveUp",
    "rule.fired": "RuleFired",
    "wait.satisfied": "WaitSatisfied",
    "error": "ErrorEvent",
    "bus.publisher_lost": "PublisherLost",
    "bus.publisher_back": "PublisherBack",
    "bus.lagged": "SubscriberLagged",
    "forgotten": "Forgotten",
}

# -- strategies ------------------------------------------------------------------------------------

_text = st.text(max_size=12)
_int = st.integers(min_value=-(2**63), max_value=2**64 - 1)


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A Hypothesis strategy for a field type as msgspec reports it."""
    if tp is str:
        return _text
    if tp is bool:
        return st.booleans()
    if tp is int:
        return _int
    if tp is float:
        return st.floats(allow_nan=False)
    if tp is type(None):
        return st.none()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(a) for a in args))
    if origin is dict:
        return st.dictionaries(_text, strategy_for(args[1]), max_size=4)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    raise NotImplementedError(f"no strategy for field type {tp!r}: extend strategy_for()")


def event_strategy(cls: type[Event]) -> st.SearchStrategy[Event]:
    fields = {f.name: strategy_for(f.type) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


any_event = st.one_of(*(event_strategy(cls) for cls in EVENT_TYPES))


def as_builtins(ev: Event) -> dict[str, Any]:
    return msgspec.to_builtins(ev)  # type: ignore[no-any-return]  # a dict for a Struct


# -- event types -------------------------------------------------------------------------------------


class TestEventTypes:
    def test_tags_are_the_stable_wire_names(self) -> None:
        """Every event type carries its explicit, never-renamed tag, and no tag is used twice."""
        assert {tag: cls.__name__ for tag, cls in TAGS.items()} == STABLE_TAGS
        assert len(TAGS) == len(EVENT_TYPES)

    @pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
    def test_events_are_frozen_keyword_only_and_tolerant(self, cls: type[Event]) -> None:
        """Events are frozen, keyword-only, tagged on ``type`` and skip unknown fields."""
        cfg = cls.__struct_config__
        assert cfg.frozen and cfg.tag_field == "type" and not cfg.forbid_unknown_fields
        params = inspect.signature(cls).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
        assert tag_of(cls) in TAGS

    @pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
    def test_no_new_required_fields(self, cls: type[Event]) -> None:
        """Only the envelope and the original payload fields are required (rule 1: new fields get defaults)."""
        required = {f.name for f in msgspec.structs.fields(cls) if f.required}
        assert required <= {"source", "backend", "state", "kind", "name", "action", "rule", "match",
                            "error_type", "message"}

    @given(ev=any_event)
    @SETTINGS
    def test_topic_names_backend_source_and_family(self, ev: Event) -> None:
        """An event's topic is ``<backend>/<source>/<family>/<slot>``, so prefixes filter by it."""
        assert ev.topic() == f"{ev.backend}/{ev.source}/{ev.FAMILY}/{ev.slot()}"

    def test_stamp_replaces_envelope_fields(self) -> None:
        """``stamp`` returns a copy with envelope fields replaced and leaves the original alone."""
        ev = StateChanged(source="s", backend="qcg", key="j", state=State.QUEUED)
        out = stamp(ev, seq=7, incarnation=2)
        assert (out.seq, out.incarnation, out.state) == (7, 2, State.QUEUED)
        assert ev.seq == 0
        with pytest.raises(AttributeError):
            ev.seq = 3  # type: ignore[misc]  # frozen: that is the test

    def test_final_states(self) -> None:
        """Only complete, aborted and cancelled are final."""
        assert {s for s in State if s.final} == {State.COMPLETE, State.ABORTED, State.CANCELLED}


# -- codec ---------------------------------------------------------------------------------------------


class TestCodecRoundTrip:
    @given(ev=any_event)
    @SETTINGS
    def test_round_trip(self, ev: Event) -> None:
        """decode(encode(ev)) gives back an equal event of the same type, for every event type."""
        out = decode(encode(ev))
        assert type(out) is type(ev)
        assert out == ev

    @pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
    @given(data=st.data())
    @SETTINGS
    def test_round_trip_each_type(self, cls: type[Event], data: st.DataObject) -> None:
        """Each event type on its own survives encode/decode (no type is left to chance)."""
        ev = data.draw(event_strategy(cls))
        assert decode(encode(ev)) == ev

    @given(ev=any_event)
    @SETTINGS
    def test_reference_msgpack_reads_what_we_write(self, ev: Event) -> None:
        """The reference ``msgpack`` package reads our bytes as the same map, tag included."""
        raw = msgpack.unpackb(encode(ev), raw=False)
        assert raw == as_builtins(ev)
        assert raw["type"] == tag_of(ev)

    @given(ev=any_event)
    @SETTINGS
    def test_we_read_what_reference_msgpack_writes(self, ev: Event) -> None:
        """Bytes written by the reference ``msgpack`` package decode into the same event."""
        assert decode(msgpack.packb(as_builtins(ev), use_bin_type=True)) == ev

    @given(events=st.lists(any_event, max_size=8))
    @SETTINGS
    def test_batch_round_trip(self, events: list[Event]) -> None:
        """A msgpack array of events (a batch) round-trips and reads as a list with msgpack."""
        data = encode_many(events)
        assert decode_many(data) == events
        assert msgpack.unpackb(data, raw=False) == [as_builtins(e) for e in events]

    @given(ev=any_event, extra=st.dictionaries(st.text(min_size=1, max_size=8).map(lambda s: "x_" + s),
                                               st.one_of(_int, _text, st.lists(_int, max_size=3)),
                                               min_size=1, max_size=3))
    @SETTINGS
    def test_unknown_fields_are_ignored(self, ev: Event, extra: dict[str, Any]) -> None:
        """A newer writer's extra fields are skipped by this reader (forward compatibility)."""
        assert decode(msgpack.packb({**as_builtins(ev), **extra})) == ev

    def test_fields_missing_from_an_old_writer_take_defaults(self) -> None:
        """An old writer that never sent a newer field is read with that field's default."""
        data = msgpack.packb({"type": "state", "source": "s", "backend": "qcg", "state": "complete"})
        ev = decode(data)
        assert ev == StateChanged(source="s", backend="qcg", state=State.COMPLETE)


class TestCodecRefusals:
    def test_reasons(self) -> None:
        """The refusal reasons are the documented statistics keys."""
        assert REASONS == ("not_msgpack", "unknown_type", "invalid", "too_large")

    @pytest.mark.parametrize(("data", "reason"), [
        (b"\xc1", "not_msgpack"),
        (b"garbage", "not_msgpack"),
        (b"", "not_msgpack"),
        (msgpack.packb({"type": "no.such.tag", "source": "s", "backend": "b"}), "unknown_type"),
        (msgpack.packb({"type": "state", "source": "s", "backend": "b"}), "invalid"),  # no state
        (msgpack.packb({"type": "state", "source": "s", "backend": "b", "state": "exploded"}), "invalid"),
        (msgpack.packb({"source": "s", "backend": "b"}), "invalid"),  # no tag
        (msgpack.packb([1, 2, 3]), "invalid"),
        (msgpack.packb(42), "invalid"),
        (b"\x91" * 50_000 + b"\x00", "invalid"),  # nested deeper than any decoder goes
    ], ids=["reserved-byte", "text", "empty", "unknown-tag", "missing-field", "bad-enum", "no-tag",
            "array", "int", "deep-nesting"])
    def test_decode_refuses_with_reason_and_topic(self, data: bytes, reason: str) -> None:
        """A frame that fits no event raises SchemaError whose reason and topic are recoverable."""
        with pytest.raises(SchemaError) as info:
            decode(data, "qcg/s/state/j")
        assert reason_of(info.value) == reason
        assert classify(data) == reason
        assert info.value.topic == "qcg/s/state/j"
        assert "qcg/s/state/j" in str(info.value)

    def test_batch_with_unknown_tag(self) -> None:
        """A batch holding one event of an unknown tag is classified ``unknown_type``."""
        good = as_builtins(LogLine(source="s", backend="b"))
        data = msgpack.packb([good, {**good, "type": "from.the.future"}])
        with pytest.raises(SchemaError) as info:
            decode_many(data)
        assert reason_of(info.value) == "unknown_type"

    def test_reason_of_foreign_message(self) -> None:
        """A SchemaError whose message has no known reason counts as ``invalid``."""
        assert reason_of(SchemaError("something odd", "t")) == "invalid"

    def test_unknown_tag_is_not_an_event(self) -> None:
        """The tag space is closed: unknown tags never decode as the base Event."""
        data = msgpack.packb({"type": "event", "source": "s", "backend": "b"})
        with pytest.raises(SchemaError):
            decode(data)


# -- exceptions -------------------------------------------------------------------------------------


def _example_args(cls: type[BaseException]) -> tuple[Any, ...]:
    """Constructor arguments for an exception class, read from its signature."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtin signature
        params = []
    if not params or params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return ("something failed", "detail")
    args: list[Any] = []
    for p in params:
        if p.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        args.append(2.5 if p.annotation in (float, "float") or p.name == "timeout" else f"<{p.name}>")
    return tuple(args)


class TestErrors:
    @pytest.mark.parametrize("cls", all_error_types(), ids=lambda c: c.__name__)
    def test_pickle_round_trip(self, cls: type[Exception]) -> None:
        """Every flowbus exception survives pickling (Ray rebuilds exceptions from ``args``)."""
        exc = cls(*_example_args(cls))
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is cls
        assert copy.args == exc.args
        assert str(copy) == str(exc)
        assert vars(copy) == vars(exc)

    def test_all_error_types_has_one_root(self) -> None:
        """Every exception the schemas package exports is in the family under FlowbusError."""
        family = set(all_error_types())
        exported = [getattr(schemas, n) for n in schemas.__all__]
        errors = {o for o in exported if isinstance(o, type) and issubclass(o, BaseException)}
        assert errors <= family
        assert all(issubclass(c, schemas.FlowbusError) for c in family)

    def test_wait_timeout_names_what_was_awaited(self) -> None:
        """WaitTimeout is a TimeoutError whose message names the awaited match and the timeout."""
        exc = schemas.WaitTimeout("qcg/s/state/j state=complete", 1.5)
        assert isinstance(exc, TimeoutError)
        assert str(exc) == "timed out after 1.5 s waiting for qcg/s/state/j state=complete"

    def test_error_event_carries_type_message_and_args(self) -> None:
        """ErrorEvent round-trips the exception's type path, message and string args."""
        ev = ErrorEvent(source="s", backend="qcg", error_type="flowbus.schemas.BackendRejected",
                        message="no such job", args=["j1"], operation="cancel")
        assert decode(encode(ev)) == ev
