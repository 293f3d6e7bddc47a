"""The broker's journal file: checksummed records, owners, the old format, torn tails, and damage
that is detected, quarantined and bridged without losing the intact records around it."""

from __future__ import annotations

import stat
import struct
import tempfile
from pathlib import Path

import msgpack
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowbus.bus import Journal
from flowbus.bus._records import DAMAGED_ERROR
from flowbus.schemas import BusError, ErrorEvent, LogLine, State, StateChanged, decode, encode

pytestmark = pytest.mark.timeout(120)

HEADER = 16  # magic (8) + version (4) + crc (4)

#: (source, seq) -> payload written
Written = dict[tuple[str, int], bytes]


def event(source: str, seq: int, epoch: int = 1) -> StateChanged | LogLine:
    """Stateful and stateless events alternate, over three slots per source."""
    if seq % 2:
        return StateChanged(source=source, backend="qcg", key=f"k{seq % 3}", state=State.ACTIVE,
                            detail=f"{source}-{seq}", seq=seq, incarnation=epoch)
    return LogLine(source=source, backend="qcg", key=f"k{seq % 3}", message=f"line {seq}", seq=seq,
                   incarnation=epoch)


def fill(journal: Journal, source: str, count: int, epoch: int = 1, owner: str = "") -> Written:
    """Register a source and append ``count`` events after what it holds; flush."""
    st_ = journal.register(source, "qcg", epoch, journal.sources[source].last_seq if source in journal.sources else 0,
                           owner)
    written: Written = {}
    for seq in range(st_.last_seq + 1, st_.last_seq + count + 1):
        ev = event(source, seq, epoch)
        written[(source, seq)] = payload = encode(ev)
        journal.append(st_, seq, ev.topic(), ev.STATEFUL, payload)
    journal.flush()
    return written


def frames(data: bytes) -> list[tuple[int, int, list[object]]]:
    """(start, end, body) of each record in an undamaged file."""
    out, pos = [], HEADER
    while pos < len(data):
        length, _crc = struct.unpack_from(">II", data, pos)
        out.append((pos, pos + 8 + length, msgpack.unpackb(data[pos + 8:pos + 8 + length])))
        pos += 8 + length
    return out


def ring(journal: Journal, source: str) -> list[int]:
    return [seq for seq, _, _ in journal.sources[source].ring]


def assert_gapless(journal: Journal) -> None:
    for s in journal.sources.values():
        assert ring(journal, s.source) == list(range(s.oldest, s.last_seq + 1)), s.source


def is_damage_filler(payload: bytes, source: str, seq: int) -> bool:
    ev = decode(payload)
    return (isinstance(ev, ErrorEvent) and ev.error_type == DAMAGED_ERROR and ev.source == source
            and ev.seq == seq and ev.operation == "journal")


class TestRoundTrip:
    def test_events_snapshot_and_epochs_survive_a_reload(self, tmp_path: Path) -> None:
        """Everything appended is back after a reload: rings, snapshot, epochs, backends."""
        journal = Journal(1000, tmp_path)
        written = fill(journal, "s1", 7) | fill(journal, "s2", 4, epoch=3)
        snapshot = dict(journal.snapshot)
        journal.close()
        again = Journal(1000, tmp_path)
        try:
            for (source, seq), payload in written.items():
                assert again.replay(again.sources[source], seq, seq) == [(seq, decode(payload).topic(), payload)]
            assert again.snapshot == snapshot
            assert [(s.source, s.backend, s.epoch, s.last_seq) for s in again.sources.values()] == [
                ("s1", "qcg", 1, 7), ("s2", "qcg", 3, 4)]
            assert (again.damaged, again.torn_bytes) == ([], 0)
        finally:
            again.close()

    def test_file_has_the_header_and_checksummed_records(self, tmp_path: Path) -> None:
        """The file starts with the magic and each record carries its length and crc32."""
        journal = Journal(100, tmp_path)
        fill(journal, "s1", 2, owner="qcg/local")
        journal.close()
        data = (tmp_path / "journal.log").read_bytes()
        assert data[:8] == b"\x89FBJ\r\n\x1a\n" and data[8:12] == b"\0\0\0\1"
        bodies = [body for _, _, body in frames(data)]
        assert bodies[0] == [1, "s1", "qcg", 1, 0, "qcg/local"]
        assert [b[:4] for b in bodies[1:]] == [[0, "s1", 1, 1], [0, "s1", 1, 2]]

    def test_files_and_directory_are_private(self, tmp_path: Path) -> None:
        """The journal and quarantine files are 0600 and the directory is narrowed to 0700."""
        folder = tmp_path / "j"
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
        journal = Journal(100, folder)
        fill(journal, "s1", 3)
        journal.close()
        path = folder / "journal.log"
        data = bytearray(path.read_bytes())
        data[frames(bytes(data))[1][1] - 2] ^= 0xFF
        path.write_bytes(bytes(data))
        path.chmod(0o644)
        Journal(100, folder).close()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((folder / "journal.damaged").stat().st_mode) == 0o600

    def test_newer_format_version_is_refused(self, tmp_path: Path) -> None:
        """A file written by a newer format version is refused rather than rewritten."""
        import zlib

        head = b"\x89FBJ\r\n\x1a\n" + (2).to_bytes(4, "big")
        (tmp_path / "journal.log").write_bytes(head + zlib.crc32(head).to_bytes(4, "big"))
        with pytest.raises(BusError, match="version 2"):
            Journal(100, tmp_path)


class TestOwner:
    def test_owner_survives_load_and_compaction(self, tmp_path: Path) -> None:
        """A registration's owner is persisted, kept by ``owner=''`` and survives compact and reload."""
        journal = Journal(3, tmp_path)
        fill(journal, "s1", 5, owner="qcg/local")
        fill(journal, "s2", 2)
        assert journal.register("s1", "qcg", 2, 5).owner == "qcg/local"  # "" keeps the owner
        journal.flush()
        journal.close()
        again = Journal(3, tmp_path)
        assert (again.sources["s1"].owner, again.sources["s2"].owner) == ("qcg/local", "")
        again.compact()
        again.close()
        third = Journal(3, tmp_path)
        try:
            assert (third.sources["s1"].owner, third.sources["s1"].epoch, third.sources["s2"].owner) == (
                "qcg/local", 2, "")
        finally:
            third.close()

    def test_a_new_owner_replaces_the_old(self, tmp_path: Path) -> None:
        """A non-empty owner given at registration replaces the one held."""
        journal = Journal(10, tmp_path)
        journal.register("s1", "qcg", 1, 0, owner="qcg/a")
        journal.register("s1", "qcg", 2, 0, owner="qcg/b")
        journal.close()
        again = Journal(10, tmp_path)
        try:
            assert again.sources["s1"].owner == "qcg/b"
        finally:
            again.close()


class TestLegacyFormat:
    @staticmethod
    def legacy(path: Path, count: int) -> list[bytes]:
        payloads, records = [], [msgpack.packb([1, "s1", "qcg", 2, 0])]
        for seq in range(1, count + 1):
            ev = event("s1", seq, 2)
            payloads.append(encode(ev))
            records.append(msgpack.packb([0, "s1", 2, seq, ev.topic(), ev.STATEFUL, payloads[-1]], use_bin_type=True))
        path.write_bytes(b"".join(records))
        return payloads

    def test_old_file_loads_and_is_rewritten_checked(self, tmp_path: Path) -> None:
        """A file without the header loads as before and is rewritten in the checksummed format."""
        path = tmp_path / "journal.log"
        payloads = self.legacy(path, 5)
        journal = Journal(100, tmp_path)
        journal.close()
        assert path.read_bytes()[:4] == b"\x89FBJ"
        again = Journal(100, tmp_path)
        try:
            src = again.sources["s1"]
            assert (src.epoch, src.last_seq, src.owner) == (2, 5, "")
            assert [p for _, _, p in again.replay(src, 1, 5)] == payloads
            assert (again.damaged, again.torn_bytes) == ([], 0)
        finally:
            again.close()

    def test_old_file_with_a_torn_tail(self, tmp_path: Path) -> None:
        """An old-format file with a half-written last record keeps the records before it."""
        path = tmp_path / "journal.log"
        self.legacy(path, 4)
        with open(path, "ab") as fh:
            fh.write(msgpack.packb([0, "s1", 2, 5, "qcg/s1/log/k2", False, b"x" * 40])[:20])
        journal = Journal(100, tmp_path)
        try:
            assert (ring(journal, "s1"), journal.torn_bytes, journal.damaged) == ([1, 2, 3, 4], 20, [])
        finally:
            journal.close()


class TestTornTail:
    def test_incomplete_last_record_is_dropped_and_counted(self, tmp_path: Path) -> None:
        """A half-written last record is cut off, counted in ``torn_bytes`` and not reported as damage."""
        journal = Journal(100, tmp_path)
        fill(journal, "s1", 6)
        journal.close()
        path = tmp_path / "journal.log"
        size = path.stat().st_size
        record = path.read_bytes()[frames(path.read_bytes())[-1][0]:]
        with open(path, "ab") as fh:
            fh.write(record[:len(record) // 2])
        with structlog.testing.capture_logs() as logs:
            again = Journal(100, tmp_path)
        try:
            assert (ring(again, "s1"), again.torn_bytes, again.damaged) == ([1, 2, 3, 4, 5, 6], len(record) // 2, [])
            assert path.stat().st_size == size
            assert [e["dropped"] for e in logs if e["event"] == "journal.tail.dropped"] == [len(record) // 2]
        finally:
            again.close()

    def test_zero_filled_tail_is_torn(self, tmp_path: Path) -> None:
        """Zeros after the last record (space a crash left allocated) are a torn tail, not damage."""
        journal = Journal(100, tmp_path)
        fill(journal, "s1", 3)
        journal.close()
        with open(tmp_path / "journal.log", "ab") as fh:
            fh.write(bytes(100))
        again = Journal(100, tmp_path)
        try:
            assert (ring(again, "s1"), again.torn_bytes, again.damaged) == ([1, 2, 3], 100, [])
        finally:
            again.close()


class TestDamage:
    def test_flipped_bytes_in_the_middle(self, tmp_path: Path) -> None:
        """Three flipped bytes in one record: that event is not replayed, all later ones are, and it is logged."""
        journal = Journal(100, tmp_path)
        written = fill(journal, "s1", 20)
        journal.close()
        path = tmp_path / "journal.log"
        data = bytearray(path.read_bytes())
        start, end, _ = frames(bytes(data))[10]  # the event s1#10
        for off in (start + 12, start + 20, end - 3):
            data[off] ^= 0x5A
        path.write_bytes(bytes(data))
        with structlog.testing.capture_logs() as logs:
            again = Journal(100, tmp_path)
        try:
            src = again.sources["s1"]
            got = {seq: p for seq, _, p in again.replay(src, 1, 20)}
            assert sorted(got) == list(range(1, 21))
            assert is_damage_filler(got[10], "s1", 10)
            assert all(got[seq] == written[("s1", seq)] for seq in range(1, 21) if seq != 10)
            damaged = [e for e in logs if e["event"] == "journal.record.damaged"]
            assert [(e["offset"], e["length"], e["source"], e["seq"], e["reason"]) for e in damaged] == [
                (start, end - start, "s1", 10, "crc")]
            assert again.damaged == [{"path": str(path), "offset": start, "length": end - start,
                                      "source": "s1", "seq": 10, "reason": "crc"}]
            quarantined = (tmp_path / "journal.damaged").read_bytes()
            assert f'"offset": {start}'.encode() in quarantined and bytes(data[start:end]) in quarantined
        finally:
            again.close()
        third = Journal(100, tmp_path)  # rewritten: the next load is clean and keeps the filler
        try:
            assert third.damaged == [] and is_damage_filler(third.replay(third.sources["s1"], 10, 10)[0][2], "s1", 10)
        finally:
            third.close()

    def test_damaged_length_field_resynchronises(self, tmp_path: Path) -> None:
        """A record whose length field is wrong is skipped and reading resumes at the next record."""
        journal = Journal(100, tmp_path)
        fill(journal, "s1", 8)
        journal.close()
        path = tmp_path / "journal.log"
        data = bytearray(path.read_bytes())
        data[frames(bytes(data))[3][0] + 1] ^= 0x01  # length + 65536: runs past the end of the file
        path.write_bytes(bytes(data))
        again = Journal(100, tmp_path)
        try:
            assert ring(again, "s1") == list(range(1, 9)) and again.torn_bytes == 0
            assert [d["reason"] for d in again.damaged] == ["length"]
        finally:
            again.close()

    def test_damaged_header_is_reported_and_records_kept(self, tmp_path: Path) -> None:
        """A flipped byte in the file header is reported; every record is still read."""
        journal = Journal(100, tmp_path)
        fill(journal, "s1", 4)
        journal.close()
        path = tmp_path / "journal.log"
        data = bytearray(path.read_bytes())
        data[2] ^= 0x10
        path.write_bytes(bytes(data))
        again = Journal(100, tmp_path)
        try:
            assert ring(again, "s1") == [1, 2, 3, 4]
            assert [(d["offset"], d["reason"]) for d in again.damaged] == [(0, "header")]
        finally:
            again.close()

    def test_history_jump_restarts_the_ring(self, tmp_path: Path) -> None:
        """A registration past what is held (history lost) restarts the ring there, live and after reload."""
        journal = Journal(100, tmp_path)
        fill(journal, "s1", 3)
        src = journal.register("s1", "qcg", 1, 10)
        assert (src.oldest, ring(journal, "s1"), len(journal)) == (11, [], 0)
        fill(journal, "s1", 2)
        journal.close()
        again = Journal(100, tmp_path)
        try:
            assert (ring(again, "s1"), again.damaged) == ([11, 12], [])
        finally:
            again.close()


#: which source (of three) each event belongs to, and whether it re-registers first (1 in 5)
histories = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4).map(lambda n: n == 0)), min_size=1, max_size=40)


class TestDamageProperty:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(history=histories, data=st.data())
    def test_flipped_bytes_never_replay_garbage_nor_lose_intact_records(
            self, tmp_path: Path, history: list[tuple[int, bool]], data: st.DataObject) -> None:
        """After 1..5 flipped bytes, replay holds written payloads or fillers, without holes or intact losses."""
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            journal = Journal(10_000, folder)
            written: Written = {}
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
                ev = event(name, seq, epochs[i])
                written[(name, seq)] = payload = encode(ev)
                journal.append(src, seq, ev.topic(), ev.STATEFUL, payload)
                if k % 3 == 2:
                    journal.flush()
            journal.close()
            path = Path(folder) / "journal.log"
            original = path.read_bytes()
            spans = frames(original)
            flipped = bytearray(original)
            for _ in range(data.draw(st.integers(1, 5), label="flips")):
                flipped[data.draw(st.integers(0, len(original) - 1), label="offset")] ^= data.draw(
                    st.integers(1, 255), label="xor")
            touched = {i for i in range(len(original)) if flipped[i] != original[i]}
            path.write_bytes(bytes(flipped))

            loaded = Journal(10_000, folder)
            try:
                assert_gapless(loaded)
                for log in loaded.sources.values():
                    for seq, topic, payload in log.ring:
                        assert written.get((log.source, seq)) == payload or is_damage_filler(payload, log.source, seq)
                        assert decode(payload).topic() == topic
                for start, end, body in spans:
                    if body[0] == 0 and not touched & set(range(start, end)):
                        source, at = body[1], body[3]
                        assert isinstance(source, str) and isinstance(at, int)
                        assert loaded.replay(loaded.sources[source], at, at)[0][2] == written[(source, at)]
                in_body = [i for start, end, _ in spans for i in touched if start + 8 <= i < end]
                lengths = [i for start, _, _ in spans for i in touched if start <= i < start + 4]
                if in_body:  # a length field flipped past the end of the file reads as a torn tail
                    assert loaded.damaged or (lengths and loaded.torn_bytes)
                if any(i < HEADER for i in touched):
                    assert any(d["reason"] == "header" for d in loaded.damaged)
                rings = {s.source: list(s.ring) for s in loaded.sources.values()}
            finally:
                loaded.close()
            clean = Journal(10_000, folder)  # damage was quarantined and the file rewritten
            try:
                assert (clean.damaged, clean.torn_bytes) == ([], 0)
                assert {s.source: list(s.ring) for s in clean.sources.values()} == rings
            finally:
                clean.close()
