"""Retention on the bus: a ``Forgotten`` event takes its resource out of the snapshot (state and
attributes), leaves a tombstone that a late joiner's wait sees, and survives compaction and a
broker restart; the journal file is bounded by ``journal-max-bytes``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowbus.bus import Journal, Match
from flowbus.schemas import (
    AttributeChanged,
    Event,
    Forgotten,
    ResourceForgotten,
    State,
    StateChanged,
    decode,
    encode,
    stamp,
)
from support.bus import BusFactory, bus_fixture, state  # noqa: F401 - bus_fixture provides `bus`

pytestmark = pytest.mark.timeout(60)


def _append(journal: Journal, source: str, events: list[Event]) -> None:
    st = journal.sources.get(source) or journal.register(source, "qcg", 1, 0)
    for ev in events:
        seq = st.last_seq + 1
        stamped = stamp(ev, seq=seq, incarnation=st.epoch)
        journal.append(st, seq, stamped.topic(), stamped.STATEFUL, encode(stamped))
    journal.flush()


def _job(key: str, st: State = State.COMPLETE) -> list[Event]:
    return [StateChanged(source="s", backend="qcg", key=key, state=st, native="SUCCEED"),
            AttributeChanged(source="s", backend="qcg", key=key, kind="label", name="host", value="n1")]


def _keys(journal: Journal) -> set[str]:
    return {decode(p).key for _s, _q, p in journal.snapshot.values()}


class TestJournal:
    def test_forgotten_key_leaves_snapshot_and_stays_out_after_compaction_and_reload(self, tmp_path: Path) -> None:
        journal = Journal(1000, tmp_path)
        _append(journal, "s", [*_job("a"), *_job("b"), *_job("c")])
        assert _keys(journal) == {"a", "b", "c"}
        _append(journal, "s", [Forgotten(source="s", backend="qcg", key="a", last_state=State.COMPLETE)])
        assert _keys(journal) == {"b", "c"}, "state and attribute slots of a are gone"
        assert [decode(p).key for p in journal.tombstones.under(["qcg/s/"])] == ["a"]
        journal.compact()
        journal.close()
        again = Journal(1000, tmp_path)
        assert _keys(again) == {"b", "c"}
        assert [decode(p).key for p in again.tombstones.under(["qcg/s/forgotten/"])] == ["a"]
        again.close()

    def test_snapshot_entries_older_than_the_ring_are_dropped_on_disk(self, tmp_path: Path) -> None:
        """With a small ring the states live only as snapshot records in the compacted file:
        forgetting removes them from the file at the next compaction."""
        journal = Journal(4, tmp_path)
        _append(journal, "s", [*_job("a"), *_job("b"), *_job("c"), *_job("d")])
        journal.compact()
        size_before = journal.file_bytes()
        _append(journal, "s", [Forgotten(source="s", backend="qcg", key=k) for k in ("a", "b", "c")])
        journal.compact()
        assert journal.file_bytes() < size_before
        journal.close()
        again = Journal(4, tmp_path)
        assert _keys(again) == {"d"}
        again.close()

    def test_reused_name_is_not_forgotten_and_loses_its_tombstone(self) -> None:
        journal = Journal(100)
        _append(journal, "s", [*_job("a"), Forgotten(source="s", backend="qcg", key="a")])
        _append(journal, "s", [StateChanged(source="s", backend="qcg", key="a", state=State.QUEUED)])
        assert _keys(journal) == {"a"}
        assert journal.tombstones.under([""]) == []

    def test_tombstones_are_bounded(self) -> None:
        journal = Journal(1000, forgotten_kept=3)
        _append(journal, "s", [e for k in "abcde" for e in (*_job(k), Forgotten(source="s", backend="qcg", key=k))])
        assert [decode(p).key for p in journal.tombstones.under([""])] == ["c", "d", "e"]
        assert journal.tombstones.count == 5 and not journal.snapshot

    def test_file_is_bounded_by_max_bytes(self, tmp_path: Path) -> None:
        """Events far beyond the limit: the file is compacted whenever it passes it and never
        grows past it by more than one batch."""
        limit = 64 * 1024
        journal = Journal(200, tmp_path, compact_bytes=limit)
        peak = 0
        for batch in range(200):
            _append(journal, "s", [state("s", f"j{batch}-{i}", State.COMPLETE) for i in range(20)])
            _append(journal, "s", [Forgotten(source="s", backend="qcg", key=f"j{batch}-{i}") for i in range(20)])
            peak = max(peak, os.path.getsize(tmp_path / "journal.log"))
        assert peak < limit + 16 * 1024, peak
        journal.close()
        again = Journal(200, tmp_path)
        st = again.sources["s"]
        assert st.last_seq == 200 * 40 and [q for q, _t, _p in st.ring] == list(range(st.last_seq - 199, st.last_seq + 1))
        again.close()


class TestMatch:
    def test_final_conditions_never_match_a_forgotten_event(self) -> None:
        gone = Forgotten(source="s", backend="qcg", key="a", last_state=State.COMPLETE)
        assert not Match("qcg/s/* final=false")(gone)
        assert not Match("qcg/s/* final=true")(gone)
        assert Match("qcg/s/forgotten/a")(gone)


class TestBroker:
    def test_late_joiner_wait_on_forgotten_key_raises_at_once(self, bus: BusFactory) -> None:
        tb = bus.broker()
        pub = bus.source(tb.address, "s")
        for ev in (*_job("a"), *_job("b")):
            pub.publish(ev)
        pub.publish(Forgotten(source="s", backend="qcg", key="a", last_state=State.COMPLETE, last_native="SUCCEED"))
        pub.flush(5)
        client = bus.client(tb.address)
        snap = client.snapshot("qcg/s/")
        assert {e.key for e in snap.events} == {"b"}
        assert [e.key for e in snap.forgotten] == ["a"]
        with pytest.raises(ResourceForgotten, match=r"qcg/s/state/a was forgotten .* ended complete"):
            client.wait("qcg/s/state/a final=true", timeout=20)
        assert client.wait("qcg/s/state/b final=true", timeout=5).key == "b"
        limits = client.stats()["limits"]
        assert limits["forgotten_kept"]["used"] == 1 and limits["snapshot_slots"]["used"] >= 2

    def test_armed_wait_raises_when_the_key_is_forgotten_meanwhile(self, bus: BusFactory) -> None:
        tb = bus.broker()
        pub = bus.source(tb.address, "s")
        pub.publish(StateChanged(source="s", backend="qcg", key="a", state=State.ACTIVE))
        pub.flush(5)
        client = bus.client(tb.address)
        with pytest.raises(ResourceForgotten), client.expect("qcg/s/state/a state=queued", timeout=20):
            pub.publish(StateChanged(source="s", backend="qcg", key="a", state=State.ABORTED))
            pub.publish(Forgotten(source="s", backend="qcg", key="a", last_state=State.ABORTED))
            pub.flush(5)

    def test_wildcard_wait_is_not_failed_by_one_forgotten_key(self, bus: BusFactory) -> None:
        tb = bus.broker()
        pub = bus.source(tb.address, "s")
        client = bus.client(tb.address)
        with client.expect("qcg/s/state/* final=true", timeout=20) as w:
            pub.publish(Forgotten(source="s", backend="qcg", key="old"))
            pub.publish(StateChanged(source="s", backend="qcg", key="new", state=State.COMPLETE))
            pub.flush(5)
        assert w.event is not None and w.event.key == "new"
