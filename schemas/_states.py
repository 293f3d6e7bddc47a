"""The normalised state every backend maps onto; each backend's native state travels beside it."""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    """Normalised resource state (the backend's own word is kept in ``native``)."""

    UNKNOWN = "unknown"
    QUEUED = "queued"
    SUBMITTED = "submitted"
    ACTIVE = "active"
    COMPLETE = "complete"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    SUSPENDED = "suspended"

    @property
    def final(self) -> bool:
        """True for states a resource does not leave by itself."""
        return self in _FINAL


_FINAL = frozenset({State.COMPLETE, State.ABORTED, State.CANCELLED})


class Observed(str, enum.Enum):
    """How a change reached flowbus."""

    PUSH = "push"  # the backend told us (QCG's publisher, guiServer relay)
    POLL = "poll"  # we asked and diffed (ecFlow news, soma status, ctrl_bps report)
    RESYNC = "resync"  # found after a reconnect or restart: it happened while we were away


class Backend(str, enum.Enum):
    """The kinds of backend flowbus speaks to; ``flowbus`` is the bus itself."""

    ECFLOW = "ecflow"
    GUISERVER = "guiserver"
    QCG = "qcg"
    SOMA = "soma"
    WMS = "wms"
    FLOWBUS = "flowbus"
