"""The bus working normally: publish/subscribe, journal and snapshot, replay requests, waits and callbacks."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowbus.bus import Match, Subscriber, as_match, ensure_grant_key, load_grant_key, make_grant
from flowbus.bus import _framing as fr
from flowbus.schemas import (
    BusClosed,
    BusRequestError,
    Event,
    Fenced,
    LogLine,
    MatchSyntaxError,
    PublisherBack,
    PublisherLost,
    State,
    StateChanged,
    WaitTimeout,
    decode,
)
from support.bus import (
    BusFactory,
    bus_fixture,  # noqa: F401 - provides the `bus` fixture
    collect,
    logline,
    seqs_of,
    state,
)

pytestmark = pytest.mark.timeout(60)


class TestPublishSubscribe:
    def test_publish_stamps_gapless_seqs(self, bus: BusFactory) -> None:
        """A new source gets epoch 1; publish() returns 1, 2, 3... and stamps seq, incarnation and time."""
        broker = bus.broker()
        sub = bus.subscriber(broker.address, "qcg/s1/")
        pub = bus.publisher(broker.address)
        assert pub.open_source("s1", "qcg") == (1, 1)
        assert [pub.publish(state("s1", f"j{i}")) for i in range(5)] == [1, 2, 3, 4, 5]
        pub.flush(5)
        got = collect(sub, 5)
        assert [(e.seq, e.incarnation) for e in got] == [(i, 1) for i in range(1, 6)]
        assert all(e.time > 0 for e in got)
        assert [e.key for e in got] == [f"j{i}" for i in range(5)]

    def test_partial_prefix_fetches_nothing_twice(self, bus: BusFactory) -> None:
        """A subscriber covering part of a source gets each match once and, with nothing lost on
        the way, the broker's ticks make it fetch nothing again (no duplicates, no replays)."""
        broker = bus.broker()
        sub = bus.subscriber(broker.address, "qcg/s1/state/")
        pub = bus.source(broker.address, "s1")
        for i in range(300):
            pub.publish(state("s1", f"j{i}") if i % 3 else logline("s1", f"j{i}"))
        pub.flush(5)
        got = collect(sub, 200)
        assert len({e.seq for e in got}) == 200
        sub.sync()  # what the ticks do: check every source up to its last seq
        assert sub.recv(0.3) is None
        stats = sub.statistics()
        assert stats.get("duplicates", 0) == 0 and stats.get("replayed", 0) == 0, stats

    def test_publish_many_and_recv_many(self, bus: BusFactory) -> None:
        """publish_many stamps consecutive seqs; recv_many hands out every ready event, in order,
        and an empty list on timeout."""
        broker = bus.broker()
        sub = bus.subscriber(broker.address, "qcg/s1/")
        pub = bus.source(broker.address, "s1", batch_max=100)
        assert pub.publish_many([state("s1", f"j{i}") for i in range(250)]) == list(range(1, 251))
        pub.flush(5)
        got: list[Event] = []
        while len(got) < 250:
            batch = sub.recv_many(5)
            assert batch, f"stalled after {len(got)} events"
            got.extend(batch)
        assert [e.seq for e in got] == list(range(1, 251))
        assert sub.recv_many(0.2) == []
        assert sub.statistics().get("duplicates", 0) == 0

    def test_source_names_without_slash(self, bus: BusFactory) -> None:
        """A source name with '/' would make topics ambiguous: the publisher refuses it."""
        broker = bus.broker()
        pub = bus.publisher(broker.address)
        for bad in ("a/b", "", "\x00x"):
            with pytest.raises(ValueError, match="source name"):
                pub.open_source(bad, "qcg")

    def test_prefix_filtering(self, bus: BusFactory) -> None:
        """Subscribers get exactly the events whose topic starts with one of their prefixes."""
        broker = bus.broker()
        states = bus.subscriber(broker.address, "qcg/a/state/")
        either = bus.subscriber(broker.address, ["qcg/a/log/", "qcg/b/"])
        pa, pb = bus.source(broker.address, "a"), bus.source(broker.address, "b")
        for i in range(6):
            pa.publish(state("a", f"j{i}") if i % 2 else logline("a", f"j{i}", "hello"))
            pb.publish(state("b", f"j{i}"))
        pa.flush(5)
        pb.flush(5)
        assert [e.topic() for e in collect(states, 3)] == ["qcg/a/state/j1", "qcg/a/state/j3", "qcg/a/state/j5"]
        got = collect(either, 9)
        assert sorted(e.topic() for e in got if e.source == "a") == ["qcg/a/log/j0", "qcg/a/log/j2", "qcg/a/log/j4"]
        assert seqs_of(got, "b") == [1, 2, 3, 4, 5, 6]
        assert states.recv(0.3) is None and either.recv(0.1) is None

    def test_start_journal_replays_then_goes_live(self, bus: BusFactory) -> None:
        """``start='journal'`` delivers what the journal holds, then live events, each once and in order."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        for i in range(50):
            pub.publish(state("s1", f"j{i % 5}"))
        pub.flush(5)
        sub = bus.subscriber(broker.address, "qcg/s1/", start="journal")
        for i in range(50):
            pub.publish(logline("s1", "x", str(i)))
        pub.flush(5)
        got = collect(sub, 100)
        assert seqs_of(got, "s1") == list(range(1, 101))
        assert sub.statistics()["replayed"] >= 50

    def test_start_live_skips_history(self, bus: BusFactory) -> None:
        """``start='live'`` delivers only what is published after the subscriber is ready."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        for _ in range(10):
            pub.publish(state("s1", "j"))
        pub.flush(5)
        sub = bus.subscriber(broker.address, "qcg/s1/")
        pub.publish(state("s1", "j", State.COMPLETE))
        pub.flush(5)
        assert seqs_of(collect(sub, 1), "s1") == [11]
        assert sub.recv(0.3) is None

    def test_a_burst_beyond_the_window_waits_and_loses_nothing(self, bus: BusFactory) -> None:
        """A burst of 3x the publisher's unacknowledged-event limit blocks publish() until the
        broker acks (back-pressure) instead of discarding: every subscriber gets every event once."""
        broker = bus.broker()
        subs = [bus.subscriber(broker.address, "qcg/burst/") for _ in range(2)]
        pub = bus.source(broker.address, "burst", max_unacked=500, window=200)
        n = 1500
        for i in range(n):
            pub.publish(state("burst", f"j{i}"))
        pub.flush(10)
        assert pub.stats["published"] == n and pub.stats["waited"] >= 1
        for sub in subs:
            got = collect(sub, n, timeout=20)
            assert sorted(e.seq for e in got) == list(range(1, n + 1))

    def test_new_incarnation_continues_the_sequence(self, bus: BusFactory) -> None:
        """A source opened again (an actor restart) gets a higher epoch and continues the journal's seq."""
        broker = bus.broker()
        first = bus.source(broker.address, "s1")
        for _ in range(5):
            first.publish(state("s1", "j"))
        first.flush(5)
        first.close()
        second = bus.publisher(broker.address)
        assert second.open_source("s1", "qcg") == (2, 6)
        assert second.publish(state("s1", "j", State.COMPLETE)) == 6
        second.flush(5)
        sub = bus.subscriber(broker.address, "qcg/s1/", start="journal")
        got = collect(sub, 6)
        assert [(e.seq, e.incarnation) for e in got] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2)]

    def test_stale_incarnation_is_fenced(self, bus: BusFactory, tmp_path: Path) -> None:
        """Once a newer incarnation of a session owns its source, the older one is fenced and cannot publish."""
        key_file = ensure_grant_key(tmp_path / "grant.key")
        broker = bus.broker(grant_key_file=str(key_file))
        grant = make_grant(load_grant_key(key_file), "s1", "qcg")
        old = bus.publisher(broker.address)
        old.open_source("s1", "qcg", grant=grant)
        old.publish(state("s1", "j"))
        old.flush(5)
        new = bus.publisher(broker.address)
        assert new.open_source("s1", "qcg", grant=grant) == (2, 2)
        old.publish(state("s1", "j", State.ABORTED))  # refused by the broker: epoch 1 < 2
        old.flush(5)  # returns once the fence arrives: a fenced source has nothing pending
        with pytest.raises(Fenced):
            old.publish(state("s1", "j"))
        assert new.publish(state("s1", "j", State.COMPLETE)) == 2
        new.flush(5)
        sub = bus.subscriber(broker.address, "qcg/s1/", start="journal")
        got = cast("list[StateChanged]", collect(sub, 2))
        assert [(e.seq, e.state) for e in got] == [(1, State.ACTIVE), (2, State.COMPLETE)]
        assert bus.client(broker.address).stats()["stats"]["fenced"] >= 1

    def test_publish_on_unopened_source(self, bus: BusFactory) -> None:
        """Publishing for a source that was never opened on this publisher raises BusClosed."""
        broker = bus.broker()
        pub = bus.publisher(broker.address)
        with pytest.raises(BusClosed):
            pub.publish(state("nope", "j"))

    def test_closed_subscriber_refuses_recv(self, bus: BusFactory) -> None:
        """recv() on a closed subscriber raises BusClosed."""
        broker = bus.broker()
        sub = bus.subscriber(broker.address)
        sub.close()
        with pytest.raises(BusClosed):
            sub.recv(0)

    def test_publisher_lost_and_back(self, bus: BusFactory) -> None:
        """A silent source is reported lost (but one that unregistered is not) and back when heard again."""
        broker = bus.broker(publisher_timeout=0.4)
        sub = bus.subscriber(broker.address, "flowbus/broker/bus/liveness/")
        pub = bus.publisher(broker.address)
        pub.open_source("crash", "qcg")
        pub.open_source("clean", "qcg")
        pub.close_source("clean")  # a graceful goodbye
        pub.close(unregister=False)  # no goodbye for "crash": as if the process died
        lost = collect(sub, 1, timeout=10)
        assert [(type(e), e.key) for e in lost] == [(PublisherLost, "crash")]
        assert isinstance(lost[0], PublisherLost) and lost[0].silent_s >= 0.4
        assert sub.recv(0.5) is None  # several ticks later: still nothing about "clean"
        assert bus.client(broker.address).stats()["lost"] == ["crash"]
        again = bus.publisher(broker.address)
        again.open_source("crash", "qcg")
        back = collect(sub, 1, timeout=10)
        assert [(type(e), e.key) for e in back] == [(PublisherBack, "crash")]
        assert bus.client(broker.address).stats()["lost"] == []

    def test_status_and_marks(self, bus: BusFactory) -> None:
        """status() gives the latest state per resource; marks() the per-source sequence range."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "a", State.QUEUED))
        pub.publish(state("s1", "b", State.QUEUED))
        pub.publish(logline("s1", "a", "not state"))
        pub.publish(state("s1", "a", State.COMPLETE))
        pub.flush(5)
        client = bus.client(broker.address)
        assert [(e.key, e.state, e.seq) for e in cast("list[StateChanged]", client.status("qcg/s1/state/"))] == [
            ("a", State.COMPLETE, 4), ("b", State.QUEUED, 2)]
        assert client.marks()["s1"] == ["qcg", 1, 4, 1]
        assert client.status("qcg/other/") == []


class TestLateJoiner:
    @pytest.mark.parametrize("start", ["snapshot", "journal"])
    def test_join_while_publishing(self, bus: BusFactory, start: str) -> None:
        """A subscriber joining mid-stream gets the snapshot (or journal) and then live events, with no gap."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        total, keys = 1500, [f"k{i}" for i in range(10)]
        joined_at = threading.Event()
        pace = threading.Event()  # never set: wait() on it paces the publisher
        last: dict[str, int] = {}

        def produce() -> None:
            for i in range(1, total + 1):
                key = keys[i % len(keys)]
                pub.publish(state("s1", key, detail=str(i)))
                last[key] = i
                if i == 400:
                    joined_at.set()
                if i % 20 == 0:
                    pace.wait(0.005)

        producer = threading.Thread(target=produce, name="producer")
        producer.start()
        assert joined_at.wait(20)
        sub = bus.subscriber(broker.address, "qcg/s1/", start=start)
        producer.join(30)
        pub.flush(10)
        got: list[Event] = []
        deadline = time.monotonic() + 20
        while (not got or got[-1].seq < total) and time.monotonic() < deadline:
            got.extend(collect(sub, 1, timeout=deadline - time.monotonic()))
        stats = sub.statistics()
        seqs = [e.seq for e in got]
        assert len(seqs) == len(set(seqs)), "duplicates delivered"
        if start == "journal":
            assert seqs == list(range(1, total + 1))
        else:
            n = stats["snapshot"]
            snapshot, live = got[:n], got[n:]
            assert 0 < n <= len(keys) and len({e.key for e in snapshot}) == n
            joined = max(e.seq for e in snapshot)
            assert joined >= 400
            assert [e.seq for e in live] == list(range(joined + 1, total + 1))
        final = {}
        for e in got:
            final[e.key] = int(cast(StateChanged, e).detail)
        assert final == last


class TestSubscriberOrdering:
    """Whatever order, repetition or batching frames arrive in, each event is delivered exactly once."""

    counter = itertools.count()

    @pytest.mark.timeout(120)
    @given(data=st.data(), partial=st.booleans())
    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    def test_exactly_once(self, bus: BusFactory, data: st.DataObject, partial: bool) -> None:
        """Frames fed out of order, repeated and batched give every matching seq exactly once after sync()."""
        broker = getattr(self, "_broker", None) or bus.broker()
        self._broker = broker  # one broker for all examples; a fresh source per example
        src = f"p{next(self.counter)}"
        prefix = f"qcg/{src}/state/" if partial else f"qcg/{src}/"
        total = 12
        with Subscriber(broker.address, prefix) as sub:
            pub = bus.source(broker.address, src)
            for i in range(1, total + 1):
                pub.publish(logline(src, "x", str(i)) if i % 3 == 0 else state(src, f"k{i % 4}"))
            pub.flush(5)
            pub.close()
            client = bus.client(broker.address)
            payloads = client._call("replay", source=src, **{"from": 1})["events"]
            frames = [(decode(p).topic().encode(), p) for p in payloads]
            matching = [i for i, (t, _) in enumerate(frames) if t.decode().startswith(prefix)]
            picks = data.draw(st.lists(st.sampled_from(matching), max_size=3 * total), label="arrivals")
            batch = data.draw(st.integers(1, 4), label="batch size")
            # what the SUB socket would see: single events, or batches under their common prefix
            for i in range(0, len(picks), batch):
                chunk = [frames[j] for j in picks[i:i + batch]]
                if len(chunk) == 1:
                    sub._handle(*chunk[0])
                else:
                    sub._handle(prefix.encode(), fr.array_header(len(chunk)) + b"".join(p for _, p in chunk))
            delivered = drain_now(sub)
            sub.sync()
            delivered += drain_now(sub)
        seqs = seqs_of(delivered, src)
        want = [i + 1 for i in matching]
        assert sorted(seqs) == want and len(seqs) == len(set(seqs))
        if not partial:
            assert seqs == want, "a subscriber covering the whole source delivers in order"


def drain_now(sub: Subscriber) -> list[Event]:
    """What a subscriber has ready, without reading its socket (recv(0) never polls)."""
    out: list[Event] = []
    while (ev := sub.recv(0)) is not None:
        out.append(ev)
    return out


class TestReplayRequests:
    @pytest.mark.parametrize(("args", "code"), [
        ({"source": "nope", "from": 1}, "unknown_source"),
        ({"source": "s1", "from": 0}, "bad_range"),
        ({"source": "s1", "from": 3, "to": 99}, "bad_range"),
        ({"source": "s1", "from": 7, "to": 4}, "bad_range"),
        ({"source": "s1"}, "bad_request"),
        ({"source": "s1", "from": "x"}, "bad_request"),
        ({"source": "s1", "from": 1, "prefixes": 5}, "bad_request"),
        ({"source": "s1", "from": 1, "limit": float("inf")}, "bad_request"),
    ], ids=["unknown-source", "from-zero", "beyond-last", "reversed", "no-from", "from-str",
            "prefixes-int", "limit-inf"])
    def test_refused(self, bus: BusFactory, args: dict[str, Any], code: str) -> None:
        """Replays of unknown sources, impossible ranges or malformed fields get an error reply, and the broker carries on."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        for _ in range(5):
            pub.publish(state("s1", "j"))
        pub.flush(5)
        client = bus.client(broker.address)
        with pytest.raises(BusRequestError, match=rf"\[{code}\]"):
            client._call("replay", **args)
        assert len(client._call("replay", source="s1", **{"from": 1})["events"]) == 5
        assert broker.alive()

    def test_evicted(self, bus: BusFactory) -> None:
        """A replay of events the bounded journal has dropped is refused as ``evicted``, naming what is kept."""
        broker = bus.broker(journal_events=10)
        pub = bus.source(broker.address, "s1")
        for _ in range(30):
            pub.publish(state("s1", "j"))
        pub.flush(5)
        client = bus.client(broker.address)
        with pytest.raises(BusRequestError, match=r"keeps seq 21\.\.30.*\[evicted\]"):
            client._call("replay", source="s1", **{"from": 5})
        reply = client._call("replay", source="s1", **{"from": 21})
        assert (len(reply["events"]), reply["through"], reply["oldest"]) == (10, 30, 21)

    def test_replay_window_and_prefix(self, bus: BusFactory) -> None:
        """A replay honours ``limit`` (with ``through`` telling where it stopped) and filters by prefix."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        for i in range(20):
            pub.publish(state("s1", "j") if i % 2 else logline("s1", "j"))
        pub.flush(5)
        client = bus.client(broker.address)
        reply = client._call("replay", source="s1", limit=5, **{"from": 3})
        assert reply["through"] == 7 and [decode(p).seq for p in reply["events"]] == [3, 4, 5, 6, 7]
        reply = client._call("replay", source="s1", prefixes=["qcg/s1/state/"], **{"from": 1})
        assert [decode(p).seq for p in reply["events"]] == list(range(2, 21, 2))

    def test_unknown_op(self, bus: BusFactory) -> None:
        """An unknown request op gets an ``unknown_op`` error reply."""
        broker = bus.broker()
        with pytest.raises(BusRequestError, match=r"\[unknown_op\]"):
            bus.client(broker.address)._call("frobnicate")


class TestWaits:
    def test_expect_catches_a_fast_transition(self, bus: BusFactory) -> None:
        """An expectation armed before acting sees a state that was passed through quickly."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        client = bus.client(broker.address)
        with client.expect("qcg/s1/state/j1 state=complete", timeout=5) as w:
            for st_ in (State.QUEUED, State.ACTIVE, State.COMPLETE, State.QUEUED):  # resubmitted at once
                pub.publish(state("s1", "j1", st_))
            pub.flush(5)
        assert isinstance(w.event, StateChanged) and (w.event.state, w.event.seq) == (State.COMPLETE, 3)

    def test_wait_on_current_state_returns_at_once(self, bus: BusFactory) -> None:
        """wait() returns immediately when the current state already matches."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "j1", State.COMPLETE))
        pub.flush(5)
        client = bus.client(broker.address)
        t0 = time.monotonic()
        ev = client.wait("qcg/s1/state/j1 final=true", timeout=10)
        assert time.monotonic() - t0 < 2
        assert isinstance(ev, StateChanged) and (ev.key, ev.state, ev.seq) == ("j1", State.COMPLETE, 1)

    def test_superseded_final_state_does_not_satisfy(self, bus: BusFactory) -> None:
        """An old final state replaced by a newer non-final one does not satisfy a later wait."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "j1", State.COMPLETE))
        pub.publish(state("s1", "j1", State.QUEUED))
        pub.flush(5)
        client = bus.client(broker.address)
        expr = "qcg/s1/state/j1 state=complete"
        with pytest.raises(WaitTimeout) as info:
            client.wait(expr, timeout=0.5)
        assert expr in str(info.value) and info.value.awaited == expr

    def test_wait_sees_an_event_after_arming(self, bus: BusFactory) -> None:
        """An armed expectation returns the first matching event published while acting."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        client = bus.client(broker.address)
        with client.expect("qcg/s1/state/* state=aborted", timeout=10) as w:
            pub.publish(state("s1", "j2", State.ACTIVE))
            pub.publish(state("s1", "j9", State.ABORTED))
        assert w.event is not None and w.event.key == "j9"

    def test_callbacks_fire_and_failures_are_recorded(self, bus: BusFactory) -> None:
        """client.on() calls back for matching events; a failing callback is recorded and the stream goes on."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        client = bus.client(broker.address)
        seen: list[str] = []
        done = threading.Event()

        def callback(ev: Event) -> None:
            if ev.key == "bad":
                raise RuntimeError("callback exploded")
            seen.append(ev.key)
            if len(seen) == 2:
                done.set()

        cb = client.on("qcg/s1/state/* state=complete", callback)
        for key, st_ in (("a", State.COMPLETE), ("x", State.ACTIVE), ("bad", State.COMPLETE), ("b", State.COMPLETE)):
            pub.publish(state("s1", key, st_))
        pub.flush(5)
        assert done.wait(10)
        cb.cancel()
        assert seen == ["a", "b"]
        assert cb.calls == 3
        assert len(cb.errors) == 1 and "RuntimeError: callback exploded" in cb.errors[0]

    def test_callback_from_snapshot(self, bus: BusFactory) -> None:
        """client.on(..., start='snapshot') first calls back for the current matching state."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "a", State.COMPLETE))
        pub.flush(5)
        client = bus.client(broker.address)
        got = threading.Event()
        with client.on("qcg/s1/state/a", lambda ev: got.set(), start="snapshot"):
            assert got.wait(10)


class TestMatch:
    @pytest.mark.parametrize(("expr", "event", "ok"), [
        ("qcg/s/state/j1", state("s", "j1"), True),
        ("qcg/s/state/j1", state("s", "j10"), False),
        ("qcg/*/state/j* state=complete|aborted", state("s", "j3", State.ABORTED), True),
        ("qcg/*/state/j* state=complete|aborted", state("s", "j3", State.ACTIVE), False),
        ("qcg/s/* state!=active", state("s", "j", State.QUEUED), True),
        ("qcg/s/* final=true", state("s", "j", State.CANCELLED), True),
        ("qcg/s/* final=false", state("s", "j", State.ACTIVE), True),
        ("qcg/s/* type=log", LogLine(source="s", backend="qcg", key="j"), True),
        ("type=log level=error", LogLine(source="s", backend="qcg", level="error"), True),
        ("qcg/s/* level=error", state("s", "j"), False),  # StateChanged has no `level`
    ])
    def test_matches(self, expr: str, event: Event, ok: bool) -> None:
        """Topic globs and field conditions decide whether an event matches."""
        assert Match(expr)(event) is ok

    @pytest.mark.parametrize(("expr", "prefix"), [
        ("qcg/local/state/job-* state=complete", "qcg/local/state/job-"),
        ("qcg/local/state/j1", "qcg/local/state/j1"),
        ("state=complete", ""),
    ])
    def test_prefix_for_the_broker(self, expr: str, prefix: str) -> None:
        """The literal part before the first wildcard is what the broker filters on."""
        assert as_match(expr).prefix == prefix

    @pytest.mark.parametrize("expr", ["", "   ", "qcg/* state", "qcg/* state=", "qcg/* =x"])
    def test_syntax_errors(self, expr: str) -> None:
        """Malformed expressions raise MatchSyntaxError, which is also a ValueError."""
        with pytest.raises(MatchSyntaxError):
            Match(expr)
        assert issubclass(MatchSyntaxError, ValueError)

    def test_predicate(self) -> None:
        """An extra predicate narrows a match."""
        m = Match("qcg/s/state/*", predicate=lambda ev: isinstance(ev, StateChanged) and ev.try_no > 1)
        assert not m(state("s", "j", try_no=1)) and m(state("s", "j", try_no=2))
