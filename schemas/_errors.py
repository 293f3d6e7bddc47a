"""One exception root for flowbus, split by cause and by whether a retry can help.

Every class pickles round-trip (Ray rebuilds exceptions from ``args``): each constructor passes
all of its arguments to ``super().__init__``.
"""

from __future__ import annotations


class FlowbusError(Exception):
    """Root of every error flowbus raises on purpose."""


# -- configuration and input -------------------------------------------------------------------


class ConfigError(FlowbusError):
    """A configuration file or value is wrong; the message names the key and the file."""


class MatchSyntaxError(FlowbusError, ValueError):
    """A wait/callback match expression cannot be parsed."""


class SchemaError(FlowbusError):
    """A frame did not decode into any known event type."""

    def __init__(self, message: str, topic: str = "") -> None:
        super().__init__(message, topic)
        self.topic = topic

    def __str__(self) -> str:
        return f"{self.args[0]} (topic {self.topic!r})" if self.topic else str(self.args[0])


# -- bus -----------------------------------------------------------------------------------------


class BusError(FlowbusError):
    """Something on the event bus failed."""


class BusClosed(BusError):
    """We closed this publisher/subscriber ourselves; using it again is a bug."""


class BusBroken(BusError):
    """The broker or the transport failed (no reply, connection lost); a retry may help."""


class PublishBackedUp(BusBroken):
    """``publish()`` waited ``block_timeout`` s at a full publisher window (``max_unacked`` events
    the broker has not acknowledged); nothing was dropped, the event was not queued."""


class BusRequestError(BusError):
    """The broker refused a request (unknown source, impossible replay range, bad request)."""


class Fenced(BusError):
    """A newer incarnation of this source owns its sequence; this publisher must stop."""


class SourceRefused(BusError):
    """The broker refused to open a source for this publisher: it belongs to a flowbus session
    (``source 'local' belongs to session qcg/local``), another publisher holds it, or the
    registration itself was invalid (a bad grant, an out-of-range epoch). Retrying will not help."""


class WaitTimeout(FlowbusError, TimeoutError):
    """A wait ended without a match; the message names what was awaited."""

    def __init__(self, awaited: str, timeout: float, detail: str = "") -> None:
        super().__init__(awaited, timeout, detail)
        self.awaited = awaited
        self.timeout = timeout
        #: what else is known, e.g. that a matching state is held but stale
        self.detail = detail

    def __str__(self) -> str:
        text = f"timed out after {self.timeout:g} s waiting for {self.awaited}"
        return f"{text} ({self.detail})" if self.detail else text


class ResourceForgotten(FlowbusError, LookupError):
    """A wait named a resource its session has forgotten (retention passed after it ended):
    no event about it will come again. The message names the wait and what it ended as."""

    def __init__(self, awaited: str, topic: str, last_state: str = "") -> None:
        super().__init__(awaited, topic, last_state)
        self.awaited = awaited
        self.topic = topic
        self.last_state = last_state

    def __str__(self) -> str:
        ended = f" after it ended {self.last_state}" if self.last_state else ""
        return (f"waiting for {self.awaited}: {self.topic} was forgotten by its session{ended} "
                "(retention passed; see docs/retention.md)")


# -- backends ------------------------------------------------------------------------------------


class BackendError(FlowbusError):
    """A backend operation failed."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached or died; transient, a retry or recovery may help."""


class BackendRejected(BackendError):
    """The backend refused our request as invalid (unknown job, bad definition, ...)."""


class BackendProtocolError(BackendError):
    """The backend sent something we cannot understand."""


class BackendTimeout(BackendUnavailable):
    """The backend did not answer within the configured timeout."""


class UnknownSession(FlowbusError, KeyError):
    """No session of that name is hosted here."""

    def __str__(self) -> str:
        if not self.args:
            return "unknown session"
        known = self.args[1] if len(self.args) > 1 else None
        where = f"; running sessions: {', '.join(known) or '(none)'}" if isinstance(known, (list, tuple)) else ""
        return f"no session named {self.args[0]!r}{where}"


class UnknownOperation(BackendRejected):
    """The session has no operation of that name."""


def all_error_types() -> list[type[FlowbusError]]:
    """Every flowbus exception class (used by the pickling test and the error registry)."""
    seen: list[type[FlowbusError]] = []
    todo: list[type[FlowbusError]] = [FlowbusError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen
