"""The bus under faults: broker crashes, garbage on every socket, and subscribers that cannot keep up."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, cast

import msgpack
import pytest
import structlog
import zmq

from flowbus.bus import Journal, Subscriber
from flowbus.bus import _framing as fr
from flowbus.schemas import (
    BusBroken,
    ErrorEvent,
    State,
    StateChanged,
    SubscriberLagged,
    encode,
)
from support.bus import (
    BusFactory,
    bus_fixture,  # noqa: F401 - provides the `bus` fixture
    collect,
    dropped_reasons,
    logline,
    seqs_of,
    state,
)

DEEP = b"\x91" * 3000 + b"\x00"  # valid msgpack, nested deeper than any decoder recurses


def reply(sock: zmq.Socket[Any], timeout: float = 5.0) -> list[bytes]:
    """The next multipart message on ``sock``; fails the test after ``timeout`` seconds."""
    assert sock.poll(int(timeout * 1000)), "no reply from the broker"
    return sock.recv_multipart()


class TestBrokerRestart:
    @pytest.mark.timeout(90)
    def test_kill_and_restart_while_publishing(self, bus: BusFactory) -> None:
        """SIGKILL and restart the broker mid-stream: every subscriber gets each matching event exactly once."""
        broker = bus.broker_process()
        address = broker.address
        pub = bus.source(address, "s1")
        subs = {
            "whole": bus.subscriber(address, "qcg/s1/", timeout=2.0),
            "partial": bus.subscriber(address, "qcg/s1/state/", timeout=2.0),
        }
        total = 3000
        want = {"whole": list(range(1, total + 1)),
                "partial": [i for i in range(1, total + 1) if i % 3]}
        milestones = {1000: threading.Event(), 1600: threading.Event()}
        pace = threading.Event()  # never set: wait() on it paces the publisher
        got: dict[str, list[int]] = {name: [] for name in subs}
        complete = {name: threading.Event() for name in subs}
        stop = threading.Event()

        def produce() -> None:
            for i in range(1, total + 1):
                ev = logline("s1", f"k{i % 7}", f"m{i}") if i % 3 == 0 else state("s1", f"k{i % 7}", detail=str(i))
                assert pub.publish(ev) == i
                if i in milestones:
                    milestones[i].set()
                pace.wait(0.0005)

        def consume(name: str, sub: Subscriber) -> None:
            while not stop.is_set():
                ev = sub.recv(0.1)
                if ev is not None and ev.source == "s1":
                    got[name].append(ev.seq)
                    if len(got[name]) >= len(want[name]):
                        complete[name].set()

        threads = [threading.Thread(target=produce, name="producer")]
        threads += [threading.Thread(target=consume, args=(n, s), name=f"consumer-{n}") for n, s in subs.items()]
        for t in threads:
            t.start()
        try:
            assert milestones[1000].wait(30)
            broker.kill()
            assert milestones[1600].wait(30)  # published while no broker runs: buffered, unacked
            broker.start()
            threads[0].join(60)
            pub.flush(30)
            for name in subs:
                assert complete[name].wait(30), f"{name}: {len(got[name])} of {len(want[name])} events"
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        for name, sub in subs.items():
            assert len(set(got[name])) == len(got[name]), f"{name}: duplicates delivered"
            assert sorted(got[name]) == want[name], f"{name}: events lost"
            assert sub.statistics()["broker_restarts"] >= 1
        # a subscription covering the whole source also keeps the order; a partial one need not
        # (it finds what it missed at the next broker tick, after later events)
        assert got["whole"] == want["whole"]
        assert pub.stats["resent"] > 0
        client = bus.client(address)
        assert client.marks()["s1"][1:3] == [1, total]  # same incarnation, nothing missing
        # the journal survived the SIGKILL: a newcomer replays everything
        late = bus.subscriber(address, "qcg/s1/", start="journal")
        assert seqs_of(collect(late, total, timeout=20), "s1") == want["whole"]

    @pytest.mark.timeout(60)
    def test_flush_fails_while_down_then_succeeds(self, bus: BusFactory) -> None:
        """flush() raises BusBroken while no broker runs, and succeeds once it is back, with nothing lost."""
        broker = bus.broker_process()
        pub = bus.source(broker.address, "s1")
        for i in range(10):
            pub.publish(state("s1", f"j{i}"))
        pub.flush(10)
        broker.kill()
        for i in range(10, 20):
            pub.publish(state("s1", f"j{i}"))
        with pytest.raises(BusBroken, match="did not acknowledge source 's1'"):
            pub.flush(0.5)
        broker.start()
        pub.flush(20)
        sub = bus.subscriber(broker.address, "qcg/s1/", start="journal")
        assert seqs_of(collect(sub, 20), "s1") == list(range(1, 21))

    @pytest.mark.timeout(60)
    def test_client_requests_fail_cleanly_while_down(self, bus: BusFactory) -> None:
        """A request to a dead broker raises BusBroken within its timeout, and works again after a restart."""
        broker = bus.broker_process()
        client = bus.client(broker.address, timeout=0.5)
        broker.kill()
        t0 = time.monotonic()
        with pytest.raises(BusBroken):
            client.marks()
        assert time.monotonic() - t0 < 3
        broker.start()
        assert "broker" in client.marks()


class TestMalformedIngest:
    @pytest.mark.timeout(60)
    def test_garbage_is_dropped_counted_and_logged_once(self, bus: BusFactory) -> None:
        """Garbage on the ingest socket is dropped and counted by reason, logged once per reason, and the broker keeps serving."""
        broker = bus.broker_process(max_frame_bytes=4096)
        watcher = bus.subscriber(broker.address, "qcg/raw/")
        ingest = bus.raw(zmq.DEALER, broker.endpoints["ingest"])

        # a source registered by hand, so that its data frames get to event decoding
        ingest.send_multipart([fr.REGISTER, fr.pack(["raw", "qcg", 0, 0, 0])])
        kind, body = reply(ingest)
        assert kind == fr.WELCOME
        _, epoch, resume, _ = fr.unpack(body)
        assert (epoch, resume) == (1, 1)
        unknown = msgpack.packb({"type": "from.the.future", "source": "raw", "backend": "qcg", "seq": 1})
        unknown2 = msgpack.packb({"type": "from.the.future", "source": "raw", "backend": "qcg", "seq": 2})
        no_state = msgpack.packb({"type": "state", "source": "raw", "backend": "qcg", "seq": 3})
        good = encode(StateChanged(source="raw", backend="qcg", key="j", state=State.COMPLETE, seq=4,
                                   incarnation=1, time=1))
        garbage: list[list[bytes]] = [
            [fr.DATA, b"\xc1 not msgpack"],                             # not_msgpack
            [fr.DATA, fr.pack({"not": "a data frame"})],                # invalid
            [fr.HEARTBEAT, fr.pack([["raw", float("inf"), 1]])],        # invalid (int(inf))
            [fr.REGISTER, DEEP],                                        # invalid (too deep)
            [fr.DATA, b"\x00" * 5000],                                  # too_large
            [b"Z", fr.pack([])],                                        # unknown_kind
            [fr.DATA],                                                  # bad_frames
            [fr.DATA, b"", b""],                                        # bad_frames
        ]
        for _ in range(2):
            for frames in garbage:
                ingest.send_multipart(frames)
        ingest.send_multipart([fr.DATA, fr.pack_data("raw", 1, 1, [unknown, unknown2, no_state, good])])
        kind, body = reply(ingest)
        assert kind == fr.ACK and fr.unpack(body)[1] == [["raw", 1, 4]]
        # data from a source this broker does not know: NACKed with -1 (register first), not garbage
        ingest.send_multipart([fr.DATA, fr.pack_data("ghost", 1, 1, [good])])
        kind, body = reply(ingest)
        assert kind == fr.NACK and fr.unpack(body) == ["ghost", 1, -1]

        # the slots of the refused events carry typed errors, so the sequence stays gapless
        got = collect(watcher, 4)
        assert [e.seq for e in got] == [1, 2, 3, 4]
        assert all(isinstance(e, ErrorEvent) and e.error_type == "flowbus.bus.InvalidEvent" for e in got[:3])
        assert [cast(ErrorEvent, e).message.split(":")[0] for e in got[:3]] == ["unknown_type", "unknown_type", "invalid"]
        assert isinstance(got[3], StateChanged) and got[3].state == State.COMPLETE

        # still serving: an ordinary publisher gets through
        pub = bus.source(broker.address, "ok")
        pub.publish(state("ok", "j"))
        pub.flush(10)
        stats = bus.client(broker.address).stats()["stats"]
        malformed = {k.removeprefix("malformed."): v for k, v in stats.items() if k.startswith("malformed.")}
        assert malformed == {"not_msgpack": 2, "invalid": 7, "too_large": 2, "unknown_kind": 2,
                             "bad_frames": 4, "unknown_type": 2}
        assert broker.alive()
        assert broker.log_path is not None and dropped_reasons(broker.log_path) == dict.fromkeys(malformed, 1)

    @pytest.mark.timeout(30)
    def test_garbage_requests_get_error_replies(self, bus: BusFactory) -> None:
        """Garbage on the request socket gets an error reply naming the problem, and the broker keeps serving."""
        broker = bus.broker(max_frame_bytes=4096)
        req = bus.raw(zmq.DEALER, broker.endpoints["request"])
        cases: list[tuple[bytes, str, Any]] = [
            (b"\xc1 not msgpack", "not_msgpack", None),
            (fr.pack([1, 2, 3]), "bad_request", None),
            (fr.pack({"op": "snapshot", "id": 7, "prefixes": 5}), "bad_request", 7),
            (fr.pack({"op": "replay", "id": 8, "source": "broker", "from": 1, "limit": float("inf")}),
             "bad_request", 8),
            (fr.pack({"op": "replay", "id": 9, "source": ["x"], "from": 1}), "unknown_source", 9),
            (DEEP, "not_msgpack", None),
            (fr.pack({"op": "info", "id": 10, "pad": "x" * 5000}), "too_large", None),
            (fr.pack({"op": 5, "id": 11}), "unknown_op", 11),
        ]
        for body, code, rid in cases:
            req.send(body)
            [answer] = reply(req)
            out = fr.unpack(answer)
            assert (out["ok"], out["code"], out["id"]) == (False, code, rid), out
            assert out["error"]
        assert broker.alive()
        assert bus.client(broker.address).stats()["stats"]["malformed.not_msgpack"] == 2


class TestMalformedAtSubscriber:
    @pytest.mark.timeout(30)
    def test_garbage_is_dropped_counted_and_logged_once(self, bus: BusFactory) -> None:
        """A subscriber drops frames it cannot decode, counts them by reason, logs once per reason and carries on."""
        broker = bus.broker(max_frame_bytes=1000)
        sub = bus.subscriber(broker.address, "qcg/x/")
        topic = b"qcg/x/state/a"
        # a frame holds at most a fan-out batch of events of at most the broker's limit each
        assert sub.max_frame_bytes == 1000 * 100
        frames = [
            (b"qcg/x/", b"\x00" * (sub.max_frame_bytes + 1)),                          # too_large
            (topic, b"garbage"),                                                        # not_msgpack
            (topic, b"\xc1"),                                                           # not_msgpack
            (topic, msgpack.packb({"type": "from.the.future", "source": "x", "backend": "qcg"})),  # unknown_type
            (topic, msgpack.packb({"type": "state", "source": "x", "backend": "qcg"})),  # invalid: no state
            (b"qcg/x/", b"\x92\x01\x02"),                                               # invalid batch
            (b"qcg/x/", DEEP),                                                          # invalid: too deep
            (fr.TICK, b"garbage"),                                                      # invalid tick
            (fr.TICK, fr.pack(["other-broker", 5])),                                    # invalid tick marks
            (fr.TICK, fr.pack(["other-broker", {"x": [1]}])),                           # invalid tick marks
        ]
        broker_id = sub.broker_id
        with structlog.testing.capture_logs() as logs:
            for t, body in frames:
                sub._handle(t, body)
        stats = sub.statistics()
        assert {k: v for k, v in stats.items() if k.startswith("malformed.")} == {
            "malformed.not_msgpack": 2, "malformed.unknown_type": 1, "malformed.invalid": 6,
            "malformed.too_large": 1}
        assert sub.pending() == 0
        assert stats.get("broker_restarts", 0) == 0 and sub.broker_id == broker_id
        dropped = [e["reason"] for e in logs if e["event"] == "subscriber.frame.dropped"]
        assert sorted(dropped) == ["invalid", "not_msgpack", "too_large", "unknown_type"]
        pub = bus.source(broker.address, "x")
        pub.publish(state("x", "a", State.COMPLETE))
        pub.flush(5)
        assert [(e.key, e.seq) for e in collect(sub, 1)] == [("a", 1)]


class TestSlowSubscriber:
    """The broker's publish listener gets a send high-water mark of 20 and the subscriber a receive
    high-water mark of 20, so a subscriber that does not read through a burst loses live events.
    A second subscriber on ``qcg/s1/log/a`` makes the broker send events one by one (it batches
    only when no subscription is narrower than the batch's common prefix)."""

    total = 3000

    def burst(self, bus: BusFactory, **config: Any) -> tuple[Subscriber, Any]:
        broker = bus.broker(publish_sndhwm=20, **config)
        slow = bus.subscriber(broker.address, "qcg/s1/", rcvhwm=20, replay_limit=500)
        bus.subscriber(broker.address, "qcg/s1/log/a")
        pub = bus.source(broker.address, "s1")
        text = "x" * 1000
        for i in range(self.total):
            pub.publish(logline("s1", "ab"[i % 2], text))
        pub.flush(20)
        return slow, broker

    @pytest.mark.timeout(60)
    def test_lost_live_events_are_replayed(self, bus: BusFactory) -> None:
        """Live events dropped for a slow subscriber are replayed from the journal: all arrive once, in order."""
        slow, _ = self.burst(bus)
        got = collect(slow, self.total, timeout=30)
        assert seqs_of(got, "s1") == list(range(1, self.total + 1))
        stats = slow.statistics()
        # lost events come back through a live seq jump (``gaps``) or, when the tail was lost, a
        # tick's marks: which of the two is timing; that they were replayed is not
        assert stats["replayed"] > 0
        assert stats["delivered"] + stats["replayed"] == self.total
        assert stats.get("dropped", 0) == 0 and not any(isinstance(e, SubscriberLagged) for e in got)

    @pytest.mark.timeout(60)
    def test_events_gone_from_the_journal_are_reported(self, bus: BusFactory) -> None:
        """What the journal no longer holds is reported (SubscriberLagged, ``dropped``); what it holds is still delivered."""
        slow, broker = self.burst(bus, journal_events=100)
        delivered: list[int] = []
        lagged: list[SubscriberLagged] = []
        covered: set[int] = set()
        deadline = time.monotonic() + 30
        while len(covered) < self.total and time.monotonic() < deadline:
            ev = slow.recv(deadline - time.monotonic())
            if isinstance(ev, SubscriberLagged):
                lagged.append(ev)
                covered.update(range(ev.first_seq, ev.last_seq + 1))
            elif ev is not None:
                delivered.append(ev.seq)
                covered.add(ev.seq)
        assert lagged, "the subscriber was not told"
        lost = [s for ev in lagged for s in range(ev.first_seq, ev.last_seq + 1)]
        # every seq is either delivered once or reported lost once, never both, never silently missing
        assert sorted(delivered + lost) == list(range(1, self.total + 1))
        assert delivered == sorted(delivered)
        stats = slow.statistics()
        assert stats["dropped"] == len(lost) == sum(ev.lost for ev in lagged)
        assert all(ev.source == "s1" and ev.backend == "qcg" and "[evicted]" in ev.detail for ev in lagged)
        # the last journal_events seqs were held when the subscriber caught up: none reported lost
        assert set(range(self.total - 99, self.total + 1)) <= set(delivered)
        assert broker.alive()


class TestJournalFile:
    @staticmethod
    def fill(journal: Journal, count: int) -> None:
        src = journal.register("s1", "qcg", 1, 0)
        for seq in range(1, count + 1):
            ev = state("s1", f"k{seq % 4}", detail=str(seq), seq=seq, incarnation=1)
            journal.append(src, seq, ev.topic(), True, encode(ev))
        journal.flush()

    def test_torn_tail_is_cut_off(self, tmp_path: Path) -> None:
        """A record half-written when the broker died is dropped at load; everything before it is kept."""
        journal = Journal(100, tmp_path)
        self.fill(journal, 6)
        journal.close()
        path = tmp_path / "journal.log"
        size = path.stat().st_size
        record = msgpack.packb([0, "s1", 1, 7, "qcg/s1/state/k3", True, b"x" * 50])
        with open(path, "ab") as fh:
            fh.write(record[: len(record) // 2])
        again = Journal(100, tmp_path)
        try:
            src = again.sources["s1"]
            assert (src.epoch, src.last_seq, [seq for seq, _, _ in src.ring]) == (1, 6, [1, 2, 3, 4, 5, 6])
            assert path.stat().st_size == size
        finally:
            again.close()

    def test_compaction_keeps_ring_snapshot_and_epochs(self, tmp_path: Path) -> None:
        """A compacted journal reloads with the same ring, the same latest states and the same epochs."""
        journal = Journal(3, tmp_path)
        self.fill(journal, 10)
        before = ({t: seq for t, (_, seq, _) in journal.snapshot.items()},
                  [seq for seq, _, _ in journal.sources["s1"].ring])
        journal.compact()
        journal.close()
        again = Journal(3, tmp_path)
        try:
            after = ({t: seq for t, (_, seq, _) in again.snapshot.items()},
                     [seq for seq, _, _ in again.sources["s1"].ring])
            assert after == before == ({"qcg/s1/state/k0": 8, "qcg/s1/state/k1": 9, "qcg/s1/state/k2": 10,
                                        "qcg/s1/state/k3": 7}, [8, 9, 10])
            assert (again.sources["s1"].epoch, again.sources["s1"].last_seq) == (1, 10)
        finally:
            again.close()
