"""Which held states are stale: sans-I/O bookkeeping of session, resync and liveness events.

A held state (the latest ``StateChanged``/``AttributeChanged`` of a slot) is *stale* when nobody
vouches that it is still true: its source lost its backend, its backend is being compared again
after a reconnect, or its publisher fell silent. Per source, from the latest events of three
slots (all stateful, so a broker snapshot holds them):

- the session slot (``Connected``/``Disconnected``): when the latest is a ``Disconnected``, every
  resource event of the source older than it is stale (also with no ``Connected`` before it: a
  session that could not reach its backend at start);
- the resync slot (``Resynced``): when the latest ``Connected`` is newer than the latest
  ``Resynced``, a resync is under way and resource events older than the ``Connected`` are stale;
  the diff it publishes (newer) is fresh at once, and its ``Resynced`` makes the rest fresh. A
  source that never published a ``Resynced`` does not announce the end of its resyncs: for it a
  ``Connected`` alone is fresh;
- the broker's liveness slot of the source (``PublisherLost``/``PublisherBack``): while the
  publisher is lost, every resource event of the source is stale.

Only resource events count (stateful events of other families than ``session``, ``resync`` and
``bus``). The rule uses only seqs, so feeding a snapshot in any order gives the same answer as
feeding the live stream in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from ._events import Connected, Disconnected, Event, PublisherBack, PublisherLost, Resynced

#: the broker's own source name (its liveness events come from it, backend ``flowbus``)
BROKER_SOURCE = "broker"
#: families whose events describe the session or the bus, not a resource; never stale
NOT_RESOURCES = frozenset({"session", "resync", "bus"})

DISCONNECTED = "disconnected"
RESYNCING = "resyncing"
PUBLISHER_LOST = "publisher lost"


class Staleness(msgspec.Struct, frozen=True, kw_only=True):
    """Why and since when the held resource states of ``source`` are stale.

    ``since_seq``: resource events of the source with a lower seq are stale (``None``: every one,
    the publisher is lost); ``since_time``: ns since the epoch of the event that made them stale;
    ``reason``: ``disconnected``, ``resyncing`` or ``publisher lost``; ``detail``: the
    ``Disconnected`` reason or the silence measured.
    """

    source: str
    since_seq: int | None
    since_time: int = 0
    reason: str = ""
    detail: str = ""

    def covers(self, seq: int) -> bool:
        """True when a resource event of this source with ``seq`` is stale."""
        return self.since_seq is None or seq < self.since_seq

    def describe(self) -> str:
        """One line for people, e.g. ``disconnected: connection refused``."""
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def is_resource(ev: Event) -> bool:
    """A held state about a resource (what staleness applies to)."""
    return ev.STATEFUL and ev.FAMILY not in NOT_RESOURCES


def watch_topics(backend: str, source: str) -> tuple[str, str, str]:
    """The topics whose latest events decide the staleness of ``source``: its session and resync
    slots and the broker's liveness slot for it."""
    return (f"{backend}/{source}/session/", f"{backend}/{source}/resync/",
            f"flowbus/{BROKER_SOURCE}/bus/liveness/{source}")


def watch_prefixes(prefix: str) -> list[str]:
    """The topic prefixes a subscription to ``prefix`` needs besides it to follow the staleness of
    every source it covers (none when ``prefix`` already covers them)."""
    parts = prefix.split("/")
    extra: list[str] = []
    if len(parts) >= 3:  # backend and source are named in full: their slots may lie outside
        extra += [f"{parts[0]}/{parts[1]}/session/", f"{parts[0]}/{parts[1]}/resync/"]
        liveness = f"flowbus/{BROKER_SOURCE}/bus/liveness/{parts[1]}"
    else:
        liveness = f"flowbus/{BROKER_SOURCE}/bus/liveness/"
    extra.append(liveness)
    return [p for p in extra if not p.startswith(prefix)]


class Freshness:
    """The staleness of every source, from the session, resync and liveness events fed to it.

    ``apply(ev)`` takes any event (the ones that do not matter are ignored) and returns True when
    a source's staleness changed; ``is_stale(ev)`` says whether a held event is stale now.
    """

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self._session: dict[str, Event] = {}
        self._resynced: dict[str, Event] = {}
        self._liveness: dict[str, Event] = {}
        self._stale: dict[str, Staleness] = {}
        for ev in events:
            self.apply(ev)

    @property
    def stale(self) -> dict[str, Staleness]:
        """Per stale source, why and since when (a copy)."""
        return dict(self._stale)

    def staleness(self, source: str) -> Staleness | None:
        return self._stale.get(source)

    def apply(self, ev: Event) -> bool:
        """Take in one event; True when the staleness of its source changed."""
        if isinstance(ev, (Connected, Disconnected)):
            table, source = self._session, ev.source
        elif isinstance(ev, Resynced):
            table, source = self._resynced, ev.source
        elif isinstance(ev, (PublisherLost, PublisherBack)):
            if ev.source != BROKER_SOURCE or ev.backend != "flowbus" or not ev.key:
                return False  # only the broker speaks for a publisher's liveness
            table, source = self._liveness, ev.key
        else:
            return False
        held = table.get(source)
        if held is not None and held.seq >= ev.seq:
            return False  # older than what is held (a snapshot fed out of order, a duplicate)
        table[source] = ev
        return self._update(source)

    def _update(self, source: str) -> bool:
        lost = self._liveness.get(source)
        session = self._session.get(source)
        resynced = self._resynced.get(source)
        new: Staleness | None = None
        if isinstance(lost, PublisherLost):
            new = Staleness(source=source, since_seq=None, since_time=lost.time, reason=PUBLISHER_LOST,
                            detail=f"silent for {lost.silent_s:g} s")
        elif isinstance(session, Disconnected):
            new = Staleness(source=source, since_seq=session.seq, since_time=session.time, reason=DISCONNECTED,
                            detail=session.reason)
        elif isinstance(session, Connected) and resynced is not None and resynced.seq < session.seq:
            new = Staleness(source=source, since_seq=session.seq, since_time=session.time, reason=RESYNCING)
        old = self._stale.get(source)
        if new is None:
            self._stale.pop(source, None)
        else:
            self._stale[source] = new
        return old != new

    def is_stale(self, ev: Event) -> bool:
        """True when ``ev`` is a resource's held state that no longer counts as current."""
        if not is_resource(ev):
            return False
        st = self._stale.get(ev.source)
        return st is not None and st.covers(ev.seq)

    def is_stale_topic(self, topic: str, source: str, seq: int) -> bool:
        """:meth:`is_stale` for a snapshot entry known by topic, source and seq (stateful)."""
        st = self._stale.get(source)
        if st is None or not st.covers(seq):
            return False
        parts = topic.split("/", 3)
        return not (len(parts) > 2 and parts[1] == source and parts[2] in NOT_RESOURCES)


def snapshot_staleness(entries: Iterable[tuple[str, str, int]],
                       held: Callable[[str], Event | None]) -> tuple[dict[str, Staleness], list[str]]:
    """For snapshot entries ``(topic, source, seq)``: the staleness of their stale sources and the
    topics of the stale entries. ``held(topic)`` returns the latest event of a topic (or None);
    it is asked only for the :func:`watch_topics` of the entries' sources."""
    entries = list(entries)
    fresh = Freshness()
    seen: set[str] = set()
    for topic, source, _seq in entries:
        if source in seen:
            continue
        seen.add(source)  # a source has one backend: the first segment of its topics
        for watched in watch_topics(topic.split("/", 1)[0], source):
            ev = held(watched)
            if ev is not None:
                fresh.apply(ev)
    stale = fresh.stale
    topics = [topic for topic, source, seq in entries
              if source in stale and fresh.is_stale_topic(topic, source, seq)] if stale else []
    return stale, topics


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The latest state of every matching slot, and the staleness of their sources."""

    events: list[Event]
    stale: dict[str, Staleness] = {}
    #: tombstones of resources under the prefixes that their sessions forgot (``Forgotten``)
    forgotten: list[Event] = []

    def staleness(self, ev: Event) -> Staleness | None:
        """Why ``ev`` is stale, or None when it counts as current."""
        st = self.stale.get(ev.source)
        return st if st is not None and is_resource(ev) and st.covers(ev.seq) else None

    def is_stale(self, ev: Event) -> bool:
        return self.staleness(ev) is not None

    def stale_topics(self) -> set[str]:
        return {ev.topic() for ev in self.events if self.is_stale(ev)}
