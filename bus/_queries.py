"""The broker's read-only request ops over the journal: ``snapshot`` and ``replay`` (no sockets)."""

from __future__ import annotations

from typing import Any

import msgspec

from flowbus.schemas import BusConfig, Event, SchemaError, decode, snapshot_staleness

from ._journal import Journal
from ._segments import SegmentedJournal


class Refused(Exception):
    """A request answered with ``{"ok": false, "code": code, "error": message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def held(journal: Journal, topic: str) -> Event | None:
    """The latest event of a snapshot slot, decoded (None: none held, or undecodable)."""
    entry = journal.snapshot.get(topic)
    try:
        return decode(entry[2], topic) if entry is not None else None
    except SchemaError:
        return None


def snapshot(journal: Journal, req: dict[str, Any]) -> dict[str, Any]:
    """The latest event of every slot under ``prefixes``; ``stale``: per source whose held resource
    states no longer count as current, why and since when; ``stale_topics``: the topics of those
    states (see ``flowbus.schemas._freshness``)."""
    prefixes = tuple(str(p) for p in req.get("prefixes") or ("",))
    hits = [(topic, src, seq, payload) for topic, (src, seq, payload) in journal.snapshot.items()
            if topic.startswith(prefixes)]
    stale, stale_topics = snapshot_staleness(((t, s, q) for t, s, q, _ in hits), lambda t: held(journal, t))
    # each entry's topic and seq, as the journal filed it: the reader checks the event is that
    # (the broker does not decode what publishers send, see ``_verify``)
    return {"events": [p for *_, p in hits], "topics": [t for t, *_ in hits], "seqs": [q for _, _, q, _ in hits],
            "stale": {s: msgspec.to_builtins(st) for s, st in stale.items()},
            "stale_topics": stale_topics, "forgotten": journal.tombstones.under(prefixes)}


def limits(journal: Journal, config: BusConfig, subscriptions: int, heard: int) -> dict[str, Any]:
    """Every bound the broker keeps, with how much of it is used (``flowbus stats``)."""
    return {
        "journal_events": {"limit": journal.capacity, "used": len(journal)},
        "journal_file_bytes": {"limit": config.journal_max_bytes, "used": journal.file_bytes()},
        **({"journal_segments": journal.segment_stats()} if isinstance(journal, SegmentedJournal) else {}),
        "snapshot_slots": {"limit": None, "used": len(journal.snapshot),
                           "bounded_by": "session retention (retain-hours, retain-count)"},
        "forgotten_kept": {"limit": journal.tombstones.kept, "used": len(journal.tombstones.stones),
                           "forgotten": journal.tombstones.count},
        "subscriptions": {"limit": config.max_subscriptions, "used": subscriptions},
        "sources": {"limit": None, "used": len(journal.sources), "heard": heard,
                    "bounded_by": "configured sessions and publishers"},
    }


def replay(journal: Journal, req: dict[str, Any]) -> dict[str, Any]:
    """A source's events ``from``..``to`` (at most ``limit``) under ``prefixes``, or only their
    seqs (``seqs_only``)."""
    source = req.get("source")
    st = journal.source(str(source))
    if st is None:
        raise Refused("unknown_source", f"unknown source {source!r}")
    try:
        first, last = int(req["from"]), int(req.get("to", st.last_seq))
        limit = max(1, min(int(req.get("limit", 10_000)), 100_000))
    except (KeyError, TypeError, ValueError):
        raise Refused("bad_request", "replay needs integer 'from' (and optional 'to', 'limit')") from None
    if first < 1 or last < first - 1 or last > st.last_seq:
        raise Refused("bad_range", f"impossible range {first}..{last} for source {source!r} (last seq {st.last_seq})")
    if first < st.oldest:
        raise Refused("evicted", f"source {source!r} keeps seq {st.oldest}..{st.last_seq}; "
                                 f"{first}..{st.oldest - 1} were evicted")
    through = min(last, first + limit - 1)
    prefixes = tuple(str(p) for p in req.get("prefixes") or ("",))
    if req.get("seqs_only"):
        # a probe: which seqs in the range match (a subscriber that has some of them live then
        # fetches only the ones it misses)
        seqs = [q for q, topic, _p in journal.replay(st, first, through) if topic.startswith(prefixes)]
        return {"seqs": seqs, "through": through, "last": st.last_seq, "oldest": st.oldest}
    hits = [(q, p) for q, topic, p in journal.replay(st, first, through) if topic.startswith(prefixes)]
    return {"events": [p for _, p in hits], "seqs": [q for q, _ in hits], "through": through,
            "last": st.last_seq, "oldest": st.oldest}
