"""Typed bus events: frozen, keyword-only, tagged msgspec structs.

Schema evolution rules (enforced in review; ``SCHEMA_VERSION`` counts breaking changes):

1. A new field always has a default, so old writers stay valid for new readers.
2. Readers skip fields they do not know (``forbid_unknown_fields=False``), so new writers stay
   valid for old readers.
3. Never change a field's type or meaning, never reuse a field name, never rename or reuse a tag.
4. A new event type gets a new tag; old readers count it as ``unknown_type`` and carry on. Adding
   a value to an enum (``State``, ``Observed``) is a breaking change and bumps ``SCHEMA_VERSION``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from ._states import Observed, State

SCHEMA_VERSION = 1

Scalar = str | int | float | bool | None


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=False):
    """The envelope every event carries.

    ``seq`` is per source, gapless and monotonic, and continues across actor restarts;
    ``incarnation`` is the epoch the broker granted the publishing session (it grows at each
    restart, so a stale incarnation can be fenced). ``time`` is ns since the epoch.
    """

    source: str
    backend: str
    key: str = ""
    seq: int = 0
    incarnation: int = 0
    time: int = 0
    observed: Observed = Observed.PUSH

    #: topic segment of this family (``<backend>/<source>/<family>/<slot>``)
    FAMILY: ClassVar[str] = "event"
    #: True when the latest event of a slot is part of the state snapshot
    STATEFUL: ClassVar[bool] = False

    def slot(self) -> str:
        """The part of the topic after the family: what one latest-state entry is about."""
        return self.key

    def topic(self) -> str:
        """The ZeroMQ topic: ``<backend>/<source>/<family>/<slot>``; prefixes filter at the broker."""
        return f"{self.backend}/{self.source}/{self.FAMILY}/{self.slot()}"


# -- state ---------------------------------------------------------------------------------------


class StateChanged(Event, tag="state", frozen=True, kw_only=True):
    """A resource (job, task, node, workflow, iteration) moved to a new state."""

    state: State
    native: str = ""
    previous: State | None = None
    native_previous: str = ""
    try_no: int = 0
    detail: str = ""
    attrs: dict[str, Scalar] = {}

    FAMILY: ClassVar[str] = "state"
    STATEFUL: ClassVar[bool] = True


class AttributeChanged(Event, tag="attr", frozen=True, kw_only=True):
    """An attribute of a resource changed: ecFlow event/meter/label, DiFX progress, QCG iteration."""

    kind: str
    name: str
    value: Scalar = None
    previous: Scalar = None

    FAMILY: ClassVar[str] = "attr"
    STATEFUL: ClassVar[bool] = True

    def slot(self) -> str:
        return f"{self.key}/{self.kind}/{self.name}"


class LogLine(Event, tag="log", frozen=True, kw_only=True):
    """A line of text from a backend: DiFX message/warning/error/alert, job or server stderr."""

    level: str = "info"
    message: str = ""
    stream: str = ""

    FAMILY: ClassVar[str] = "log"


# -- session -------------------------------------------------------------------------------------


class Connected(Event, tag="connected", frozen=True, kw_only=True):
    """The session reached its backend (first time or after a reconnect)."""

    address: str = ""
    detail: str = ""

    FAMILY: ClassVar[str] = "session"
    STATEFUL: ClassVar[bool] = True


class Disconnected(Event, tag="disconnected", frozen=True, kw_only=True):
    """The session lost its backend; ``reason`` says why."""

    reason: str = ""
    will_retry: bool = True

    FAMILY: ClassVar[str] = "session"
    STATEFUL: ClassVar[bool] = True


class Resynced(Event, tag="resynced", frozen=True, kw_only=True):
    """A full comparison with the backend finished; ``changed`` differences were published."""

    changed: int = 0
    resources: int = 0

    FAMILY: ClassVar[str] = "resync"
    #: the latest per source is in the snapshot: staleness needs it (see ``_freshness``)
    STATEFUL: ClassVar[bool] = True


class Heartbeat(Event, tag="heartbeat", frozen=True, kw_only=True):
    """The session is alive."""

    FAMILY: ClassVar[str] = "heartbeat"


# -- recovery and orchestration -----------------------------------------------------------------


class RecoveryAttempted(Event, tag="recovery.attempted", frozen=True, kw_only=True):
    """A recovery action was started for ``key`` (a resource or the whole session)."""

    action: str
    attempt: int = 1
    reason: str = ""
    ok: bool = True
    detail: str = ""

    FAMILY: ClassVar[str] = "recovery"


class RecoveryGaveUp(Event, tag="recovery.gave_up", frozen=True, kw_only=True):
    """Recovery of ``key`` stopped after ``attempts`` attempts."""

    attempts: int = 0
    reason: str = ""

    FAMILY: ClassVar[str] = "recovery"


class RuleFired(Event, tag="rule.fired", frozen=True, kw_only=True):
    """An orchestration rule fired."""

    rule: str
    trigger_seq: int = 0
    detail: str = ""

    FAMILY: ClassVar[str] = "rule"


class WaitSatisfied(Event, tag="wait.satisfied", frozen=True, kw_only=True):
    """A published wait was satisfied."""

    match: str
    detail: str = ""

    FAMILY: ClassVar[str] = "wait"


class ErrorEvent(Event, tag="error", frozen=True, kw_only=True):
    """A failure made visible on the bus: exception type path, message and string args."""

    error_type: str
    message: str
    args: list[str] = []
    operation: str = ""

    FAMILY: ClassVar[str] = "error"


# -- retention -----------------------------------------------------------------------------------


class Forgotten(Event, tag="forgotten", frozen=True, kw_only=True):
    """The session forgot the final resource ``key`` (its retention passed): the broker drops the
    key's state and attributes from the snapshot and keeps a tombstone, and a wait on the key
    raises ``ResourceForgotten`` instead of hanging. ``last_state``/``last_native`` are what the
    resource ended as; ``in_backend`` says whether the backend was asked to forget it too."""

    last_state: State | None = None
    last_native: str = ""
    in_backend: bool = False

    FAMILY: ClassVar[str] = "forgotten"


# -- the bus itself ------------------------------------------------------------------------------


class PublisherLost(Event, tag="bus.publisher_lost", frozen=True, kw_only=True):
    """The broker heard nothing from source ``key`` for ``silent_s`` seconds."""

    silent_s: float = 0.0

    FAMILY: ClassVar[str] = "bus"
    STATEFUL: ClassVar[bool] = True

    def slot(self) -> str:
        return f"liveness/{self.key}"


class PublisherBack(Event, tag="bus.publisher_back", frozen=True, kw_only=True):
    """Source ``key`` is heard from again after a ``PublisherLost``."""

    FAMILY: ClassVar[str] = "bus"
    STATEFUL: ClassVar[bool] = True

    def slot(self) -> str:
        return f"liveness/{self.key}"


class SubscriberLagged(Event, tag="bus.lagged", frozen=True, kw_only=True):
    """Made locally by a subscriber: events it could not recover (evicted from the journal)."""

    lost: int = 0
    first_seq: int = 0
    last_seq: int = 0
    detail: str = ""

    FAMILY: ClassVar[str] = "bus"


AnyEvent = (
    StateChanged
    | AttributeChanged
    | LogLine
    | Connected
    | Disconnected
    | Resynced
    | Heartbeat
    | RecoveryAttempted
    | RecoveryGaveUp
    | RuleFired
    | WaitSatisfied
    | ErrorEvent
    | PublisherLost
    | PublisherBack
    | SubscriberLagged
    | Forgotten
)

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__

TAGS: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls for cls in EVENT_TYPES  # type: ignore[misc]  # our tags are all str
}


def tag_of(event: Event | type[Event]) -> str:
    """The stable wire tag of an event or event type."""
    return str(event.__struct_config__.tag)


def stamp(event: Any, **fields: Any) -> Any:
    """A copy of ``event`` with envelope fields replaced (events are frozen)."""
    return msgspec.structs.replace(event, **fields)
