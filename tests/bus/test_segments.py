"""The broker's on-disk journal in segments: rotation at ``journal-segment-bytes``, the oldest
dropped past ``journal-max-bytes`` (or ``journal-max-age-hours``) after their latest states went
into a snapshot segment, gapless replay across segments after a restart, damage in one segment
reported by file and offset, and ``flowbus stats`` listing the segments."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowbus.bus._segments import SegmentedJournal, segment_name
from flowbus.schemas import ErrorEvent, Forgotten, LogLine, State, StateChanged, decode, encode, stamp
from support.bus import BusFactory, bus_fixture, collect, state  # noqa: F401 - bus_fixture provides `bus`

pytestmark = pytest.mark.timeout(90)

SEGMENT = 8 * 1024
TOTAL = 32 * 1024


def segment_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("journal.0"))


def records(path: Path) -> list[list[Any]]:
    """The record bodies of an undamaged segment file."""
    data, pos, out = path.read_bytes(), 16, []
    while pos < len(data):
        length = struct.unpack_from(">I", data, pos)[0]
        out.append(msgpack.unpackb(data[pos + 8:pos + 8 + length]))
        pos += 8 + length
    return out


def append(journal: SegmentedJournal, source: str, events: list[StateChanged | LogLine | Forgotten]) -> None:
    st = journal.sources.get(source) or journal.register(source, "qcg", 1, 0)
    for ev in events:
        seq = st.last_seq + 1
        stamped = stamp(ev, seq=seq, incarnation=st.epoch)
        journal.append(st, seq, stamped.topic(), stamped.STATEFUL, encode(stamped))
    journal.flush()


def job(key: str, st: State = State.COMPLETE) -> StateChanged:
    return StateChanged(source="s", backend="qcg", key=key, state=st, detail="x" * 60)


def line(n: int) -> LogLine:
    return LogLine(source="s", backend="qcg", key="log", message=f"line {n} " + "y" * 60)


class TestJournalSegments:
    def test_rotates_drops_the_oldest_and_a_reload_keeps_every_live_state(self, tmp_path: Path) -> None:
        """Far beyond the limit: several segments, the first ones gone, the total within the limit
        (plus the snapshot segment and one write), and after a reload every state not forgotten
        and a gapless ring."""
        journal = SegmentedJournal(100, tmp_path, TOTAL, segment_bytes=SEGMENT)
        seen: set[str] = set()
        peak = 0
        for batch in range(60):
            append(journal, "s", [job(f"j{batch}"), *[line(batch * 10 + i) for i in range(8)]])
            seen.add(segment_files(tmp_path)[-1].name)
            snap = journal.segments[0].size if journal.segments[0].snapshot else 0
            # the documented bound: the limit, plus the snapshot segment, plus one write (< 2 KiB here)
            peak = max(peak, sum(p.stat().st_size for p in segment_files(tmp_path)) - snap)
        files = segment_files(tmp_path)
        assert len(files) >= 3, files
        assert segment_name(1) not in {p.name for p in files}, "the oldest segments were dropped"
        assert len(seen) > len(files), "more segments were written than remain"
        assert peak <= TOTAL + 2048, peak
        assert journal.segment_stats()["count"] == len(files) and journal.dropped_segments > 0
        snapshot = dict(journal.snapshot)
        last = journal.sources["s"].last_seq
        journal.close()
        again = SegmentedJournal(100, tmp_path, TOTAL, segment_bytes=SEGMENT)
        try:
            assert again.snapshot == snapshot, "every latest state survives the dropped segments"
            assert {decode(p).key for _s, _q, p in again.snapshot.values()} == {f"j{b}" for b in range(60)}
            src = again.sources["s"]
            assert src.last_seq == last and src.oldest <= last
            assert [q for q, _t, _p in src.ring] == list(range(src.oldest, last + 1)), "gapless"
            assert (again.damaged, again.torn_bytes) == ([], 0)
        finally:
            again.close()

    def test_forgotten_keys_stay_forgotten_across_a_drop(self, tmp_path: Path) -> None:
        """A tombstone whose event lived in a dropped segment is carried by the snapshot segment."""
        journal = SegmentedJournal(10, tmp_path, TOTAL, segment_bytes=SEGMENT)
        append(journal, "s", [job("a"), job("b"), Forgotten(source="s", backend="qcg", key="a")])
        for batch in range(40):
            append(journal, "s", [line(batch * 10 + i) for i in range(9)])
        assert segment_name(1) not in {p.name for p in segment_files(tmp_path)}
        journal.close()
        again = SegmentedJournal(10, tmp_path, TOTAL, segment_bytes=SEGMENT)
        try:
            assert {decode(p).key for _s, _q, p in again.snapshot.values()} == {"b"}
            assert [decode(p).key for p in again.tombstones.under(["qcg/s/"])] == ["a"]
        finally:
            again.close()

    def test_age_limit_drops_old_segments(self, tmp_path: Path) -> None:
        """A closed segment older than ``max_age_hours`` is dropped at the next write, its states kept."""
        journal = SegmentedJournal(100, tmp_path, 1 << 30, segment_bytes=SEGMENT, max_age_hours=1.0)
        for batch in range(20):
            append(journal, "s", [job(f"j{batch}"), *[line(batch * 10 + i) for i in range(8)]])
        names = [p.name for p in segment_files(tmp_path)]
        assert len(names) >= 3
        for seg in journal.segments[:-1]:
            assert seg.closed is not None
            seg.closed -= 2 * 3600  # as if closed two hours ago
        append(journal, "s", [job("late")])
        files = segment_files(tmp_path)
        assert len(files) == 2, files  # the snapshot segment and the one being written
        journal.close()
        again = SegmentedJournal(100, tmp_path, 1 << 30, segment_bytes=SEGMENT, max_age_hours=1.0)
        try:
            assert {decode(p).key for _s, _q, p in again.snapshot.values()} == {f"j{b}" for b in range(20)} | {"late"}
        finally:
            again.close()

    def test_a_slowly_filling_segment_is_closed_by_age(self, tmp_path: Path) -> None:
        """With an age limit, the segment being written is closed once it is a quarter of it old,
        so a quiet broker's events do not stay in one open segment past the limit."""
        journal = SegmentedJournal(100, tmp_path, 1 << 30, segment_bytes=1 << 20, max_age_hours=4.0)
        try:
            append(journal, "s", [job("a")])
            assert [p.name for p in segment_files(tmp_path)] == [segment_name(1)]
            journal.segments[-1].opened -= 3600 + 60  # opened just over an hour ago
            append(journal, "s", [job("b")])
            assert [p.name for p in segment_files(tmp_path)] == [segment_name(1), segment_name(2)]
            assert journal.segments[0].closed is not None
        finally:
            journal.close()

    def test_damage_at_the_end_of_a_segment_is_bridged_in_the_next(self, tmp_path: Path) -> None:
        """The last record of a segment flipped: reported with that file and offset, its event a
        filler, and every event before and after it (in the next segment) still held."""
        journal = SegmentedJournal(1000, tmp_path, 1 << 30, segment_bytes=SEGMENT)
        for batch in range(12):
            append(journal, "s", [job(f"j{batch}"), *[line(batch * 10 + i) for i in range(8)]])
        last = journal.sources["s"].last_seq
        journal.close()
        first = segment_files(tmp_path)[0]
        data = bytearray(first.read_bytes())
        pos, start, end = 16, 0, 0
        while pos < len(data):  # the offsets of the segment's last record
            length = struct.unpack_from(">I", data, pos)[0]
            start, end, pos = pos, pos + 8 + length, pos + 8 + length
        seq = msgpack.unpackb(bytes(data[start + 8:end]))[3]
        data[end - 5] ^= 0x5A
        first.write_bytes(bytes(data))
        again = SegmentedJournal(1000, tmp_path, 1 << 30, segment_bytes=SEGMENT)
        try:
            src = again.sources["s"]
            assert [q for q, _t, _p in src.ring] == list(range(1, last + 1))
            filler = decode(again.replay(src, seq, seq)[0][2])
            assert isinstance(filler, ErrorEvent) and filler.error_type == "flowbus.bus.JournalDamaged"
            assert first.name in filler.message and str(start) in filler.message
            assert again.damaged == [{"path": str(first), "offset": start, "length": end - start,
                                      "source": "s", "seq": seq, "reason": "crc"}]
        finally:
            again.close()

    @pytest.mark.parametrize("policy", ["none", "interval"])
    def test_runs_and_fsync_follow_the_segments(self, tmp_path: Path, policy: str) -> None:
        """Events appended as runs (one data frame each) rotate and drop like single ones and
        replay gaplessly after a reload; with an fsync policy each closed segment was synced
        (an interval of an hour: the syncs are the rotations'), with ``none`` nothing is."""
        journal = SegmentedJournal(1000, tmp_path, TOTAL, segment_bytes=SEGMENT, fsync=policy, fsync_interval=3600)
        src = journal.register("s", "qcg", 1, 0)
        for batch in range(40):
            events = [stamp(e, seq=src.last_seq + 1 + i, incarnation=1)
                      for i, e in enumerate([job(f"j{batch}"), *[line(batch * 10 + i) for i in range(8)]])]
            journal.append_frame(src, src.last_seq + 1, [e.topic() for e in events],
                                 bytes(e.STATEFUL for e in events), [encode(e) for e in events])
            journal.flush()
        rotations = journal.segments[-1].number - 1
        assert rotations >= 3 and journal.dropped_segments > 0
        assert journal.fsyncs == (0 if policy == "none" else rotations)
        journal.close()
        files = segment_files(tmp_path)
        # publishers' frames are one record each (tag 2, ``body[3]`` its first seq)
        on_disk = [body[3] for path in files[1:] for body in records(path) if body[0] in (0, 2)]
        assert all(body[3] < on_disk[0] for body in records(files[0]) if body[0] == 0), "the first is a snapshot"
        again = SegmentedJournal(1000, tmp_path, TOTAL, segment_bytes=SEGMENT)
        try:
            log_ = again.sources["s"]
            assert log_.last_seq == 40 * 9 and log_.oldest == on_disk[0], "the ring holds every event on disk"
            assert [q for q, _t, _p in log_.ring] == list(range(log_.oldest, log_.last_seq + 1))
            assert {decode(p).key for _s, _q, p in again.snapshot.values()} == {f"j{b}" for b in range(40)}
        finally:
            again.close()

    def test_single_file_journal_becomes_a_segment(self, tmp_path: Path) -> None:
        """A directory holding the earlier ``journal.log`` loads it and rewrites it as a segment."""
        from flowbus.bus import Journal

        old = Journal(100, tmp_path)
        append(old, "s", [job("a"), line(1)])  # type: ignore[arg-type]
        old.close()
        journal = SegmentedJournal(100, tmp_path, TOTAL, segment_bytes=SEGMENT)
        try:
            assert not (tmp_path / "journal.log").exists()
            assert [p.name for p in segment_files(tmp_path)] == [segment_name(1)]
            assert [q for q, _t, _p in journal.sources["s"].ring] == [1, 2]
        finally:
            journal.close()


class TestBrokerSegments:
    def test_broker_rotates_and_replays_gaplessly_after_a_restart(self, bus: BusFactory) -> None:
        """A real broker past its limit: several segments, old ones gone, the total bounded;
        after a restart a subscriber replays every held event in order, and the latest states."""
        proc = bus.broker_process(journal_max_bytes=TOTAL, journal_segment_bytes=SEGMENT)
        folder = Path(proc.journal_dir or "")
        pub = bus.source(proc.address, "s1")
        for i in range(300):
            pub.publish(state("s1", f"j{i % 50}", State.ACTIVE, detail=f"{i}-" + "z" * 80))
            if i % 20 == 19:
                pub.flush(5)
        pub.flush(5)
        files = segment_files(folder)
        assert len(files) >= 3 and segment_name(1) not in {p.name for p in files}, files
        assert sum(p.stat().st_size for p in files) <= TOTAL + SEGMENT + 4096
        pub.close()
        proc.stop()
        files = segment_files(folder)
        on_disk = [body[3] for path in files[1:] for body in records(path) if body[0] in (0, 2) and body[1] == "s1"]
        proc.start()
        client = bus.client(proc.address)
        snap = client.snapshot("qcg/s1/")
        assert {e.key for e in snap.events} == {f"j{k}" for k in range(50)}
        held = {e.key: e.detail for e in snap.events if isinstance(e, StateChanged)}
        assert held["j49"].startswith("299-") and held["j0"].startswith("250-")
        sub = bus.subscriber(proc.address, "qcg/s1/", start="journal")
        got = collect(sub, 301 - on_disk[0], timeout=10, keep=lambda e: e.source == "s1")
        seqs = [e.seq for e in got]
        assert seqs == list(range(on_disk[0], 301)), "replay across segments is gapless, from the oldest on disk"
        assert all(not isinstance(e, ErrorEvent) for e in got)

    def test_corrupt_record_in_one_segment_is_reported_and_the_rest_loads(self, bus: BusFactory) -> None:
        """Flipped bytes in a middle segment: the broker names that file and the offset, and
        every other event still replays."""
        proc = bus.broker_process(journal_max_bytes=1 << 30, journal_segment_bytes=SEGMENT)
        folder = Path(proc.journal_dir or "")
        pub = bus.source(proc.address, "s1")
        for i in range(200):
            pub.publish(state("s1", f"j{i}", detail="w" * 60))
            if i % 20 == 19:
                pub.flush(5)
        pub.flush(5)
        pub.close()
        proc.stop()
        files = segment_files(folder)
        assert len(files) >= 3, files
        victim = files[1]
        data = bytearray(victim.read_bytes())
        hit = re.search(rb"state/(j\d+)", bytes(data))  # the topic of an event record in the middle segment
        assert hit is not None
        key, at = hit.group(1).decode(), hit.start(1)
        data[at:at + 2] = b"\xff\xfe"
        victim.write_bytes(bytes(data))
        proc.start()
        sub = bus.subscriber(proc.address, "", start="journal")
        got = collect(sub, 201, timeout=10)  # 199 intact + 1 filler for s1, and the broker's report
        errors = [e for e in got if isinstance(e, ErrorEvent) and e.error_type == "flowbus.bus.JournalDamaged"]
        report = [e for e in errors if e.source == "broker"]
        assert report and victim.name in report[0].message and "offset" in report[0].message, errors
        keys = {e.key for e in got if isinstance(e, StateChanged) and e.source == "s1"}
        # a publisher's frame is one record: the damaged record's events are all fillers
        missing = {f"j{i}" for i in range(200)} - keys
        assert key in missing and len(missing) == len([e for e in errors if e.source == "s1"])
        seqs = sorted(e.seq for e in got if e.source == "s1")
        assert seqs == list(range(1, 201)), "the damaged events are fillers; no hole"

    def test_flowbus_stats_lists_the_segments(self, bus: BusFactory) -> None:
        """``flowbus stats`` shows the segments' count and bytes with their limits."""
        proc = bus.broker_process(journal_max_bytes=TOTAL, journal_segment_bytes=SEGMENT, journal_max_age_hours=12.0)
        pub = bus.source(proc.address, "s1")
        for i in range(120):
            pub.publish(state("s1", f"j{i}", detail="v" * 80))
        pub.flush(5)
        env = {**os.environ, "FLOWBUS_STATE_DIR": str(bus.tmp_path / "state")}
        deadline = time.monotonic() + 60
        r = subprocess.run([sys.executable, "-m", "flowbus", "stats", "--json", "--address", proc.address],
                           capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()), env=env)
        assert r.returncode == 0, r.stderr
        segs = json.loads(r.stdout)["limits"]["journal_segments"]
        files = segment_files(Path(proc.journal_dir or ""))
        assert segs["count"] == len(files) >= 2
        assert segs["bytes"] == sum(p.stat().st_size for p in files)
        assert (segs["segment_bytes"], segs["max_bytes"], segs["max_age_hours"]) == (SEGMENT, TOTAL, 12.0)


#: which source (of three) each event belongs to, and whether it re-registers first (1 in 5)
histories = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4).map(lambda n: n == 0)), min_size=1, max_size=60)


class TestDamageAcrossSegments:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(history=histories, data=st.data())
    def test_flipped_bytes_in_any_segment_never_replay_garbage_nor_leave_holes(
            self, tmp_path: Path, history: list[tuple[int, bool]], data: st.DataObject) -> None:
        """Events over several small segments, 1..5 bytes flipped anywhere: after a reload every
        ring is gapless and holds only written payloads or damage fillers, and every untouched
        record of the last segment is replayed."""
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            journal = SegmentedJournal(10_000, folder, 1 << 30, segment_bytes=1024)
            written: dict[tuple[str, int], bytes] = {}
            epochs = [1, 1, 1]
            for s in ("a", "b", "c"):
                journal.register(s, "qcg", 1, 0)
            for k, (i, again) in enumerate(history):
                name = "abc"[i]
                src = journal.sources[name]
                if again:
                    epochs[i] += 1
                    src = journal.register(name, "qcg", epochs[i], src.last_seq)
                seq = src.last_seq + 1
                ev = StateChanged(source=name, backend="qcg", key=f"k{seq % 3}", state=State.ACTIVE,
                                  detail=f"{name}-{seq}", seq=seq, incarnation=epochs[i])
                written[(name, seq)] = payload = encode(ev)
                journal.append(src, seq, ev.topic(), ev.STATEFUL, payload)
                if k % 3 == 2:
                    journal.flush()
            journal.close()
            files = segment_files(Path(folder))
            originals = {p: p.read_bytes() for p in files}
            for _ in range(data.draw(st.integers(1, 5), label="flips")):
                victim = files[data.draw(st.integers(0, len(files) - 1), label="segment")]
                raw = bytearray(victim.read_bytes())
                raw[data.draw(st.integers(0, len(raw) - 1), label="offset")] ^= data.draw(st.integers(1, 255), label="xor")
                victim.write_bytes(bytes(raw))
            intact: list[tuple[str, int]] = []  # event records no flip touched
            for path, original in originals.items():
                now = path.read_bytes()
                pos = 16
                while pos < len(original):
                    length = struct.unpack_from(">I", original, pos)[0]
                    body = msgpack.unpackb(original[pos + 8:pos + 8 + length])
                    if body[0] == 0 and now[pos:pos + 8 + length] == original[pos:pos + 8 + length]:
                        intact.append((body[1], body[3]))
                    pos += 8 + length
            loaded = SegmentedJournal(10_000, folder, 1 << 30, segment_bytes=1024)
            try:
                for log_ in loaded.sources.values():
                    assert [q for q, _t, _p in log_.ring] == list(range(log_.oldest, log_.last_seq + 1)), log_.source
                    for seq, topic, payload in log_.ring:
                        got = decode(payload)
                        assert written.get((log_.source, seq)) == payload or (
                            isinstance(got, ErrorEvent) and got.error_type == "flowbus.bus.JournalDamaged"
                            and got.seq == seq and got.source == log_.source)
                        assert got.topic() == topic
                for name, seq in intact:
                    assert loaded.replay(loaded.sources[name], seq, seq)[0][2] == written[(name, seq)], (name, seq)
            finally:
                loaded.close()
