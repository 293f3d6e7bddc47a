"""Staleness: a session that lost its backend (or is resyncing, or whose publisher fell silent)
has its held resource states marked stale in snapshots, ``flowbus status`` and waits.

The tracker (``flowbus.schemas.Freshness``) is tested on its own; the rest against a real broker,
publishing as a flowbus session would (a granted source) the events sessions publish:
``Connected``, resource states, ``Resynced``, ``Disconnected``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from flowbus.bus import Publisher, make_grant
from flowbus.bus._request import Requester
from flowbus.schemas import (
    AttributeChanged,
    Connected,
    Disconnected,
    Event,
    Freshness,
    LogLine,
    Observed,
    PublisherBack,
    PublisherLost,
    Resynced,
    State,
    StateChanged,
    WaitTimeout,
    snapshot_staleness,
    watch_prefixes,
)
from support.bus import (
    BusFactory,
    bus_fixture,  # noqa: F401 - provides the `bus` fixture
    collect,
    state,
)

pytestmark = pytest.mark.timeout(90)

FLOWBUS = [sys.executable, "-m", "flowbus"]


def ev(cls: type[Event], seq: int, source: str = "s1", **fields: Any) -> Any:
    fields.setdefault("backend", "qcg")
    if cls is StateChanged:
        fields.setdefault("state", State.ACTIVE)
    return cls(source=source, seq=seq, time=seq * 1_000_000_000, **fields)


def lost(seq: int, key: str = "s1", cls: type[Event] = PublisherLost, source: str = "broker") -> Any:
    return cls(source=source, backend="flowbus", key=key, seq=seq)


# -- the tracker ---------------------------------------------------------------------------------------


class TestFreshness:
    def test_disconnected_makes_older_resource_states_stale(self) -> None:
        """After a Disconnected, resource states older than it are stale; newer ones and the
        session's own events are not; another source is untouched."""
        f = Freshness()
        j1, a1 = ev(StateChanged, 2, key="j1"), ev(AttributeChanged, 3, key="j1", kind="label", name="l")
        other = ev(StateChanged, 2, source="s2", key="j1")
        for e in (ev(Connected, 1), j1, a1, other, ev(Resynced, 4)):
            assert f.apply(e) is False  # nothing becomes stale on the way
        assert not f.is_stale(j1)
        down = ev(Disconnected, 5, reason="connection refused")
        assert f.apply(down) is True
        assert f.is_stale(j1) and f.is_stale(a1)
        assert not f.is_stale(other) and not f.is_stale(down) and not f.is_stale(ev(Resynced, 4))
        assert not f.is_stale(ev(StateChanged, 6, key="j2"))  # published after the Disconnected
        assert not f.is_stale(ev(LogLine, 3, key="j1"))  # not a held state
        st = f.staleness("s1")
        assert st is not None and (st.since_seq, st.reason, st.detail) == (5, "disconnected", "connection refused")
        assert st.since_time == 5_000_000_000 and set(f.stale) == {"s1"}

    def test_resync_after_reconnect(self) -> None:
        """A Connected newer than the last Resynced: older states are stale, the diff is fresh at
        once, and the Resynced makes everything fresh."""
        f = Freshness([ev(Connected, 1), ev(StateChanged, 2, key="j1"), ev(StateChanged, 3, key="j2"),
                       ev(Resynced, 4), ev(Disconnected, 5)])
        j1, j2 = ev(StateChanged, 2, key="j1"), ev(StateChanged, 3, key="j2")
        assert f.apply(ev(Connected, 6)) is True
        st = f.staleness("s1")
        assert st is not None and (st.reason, st.since_seq) == ("resyncing", 6)
        diff = ev(StateChanged, 7, key="j2", state=State.COMPLETE, observed=Observed.RESYNC)
        f.apply(diff)
        assert f.is_stale(j1) and f.is_stale(j2) and not f.is_stale(diff)
        assert f.apply(ev(Resynced, 8, changed=1)) is True
        assert not f.is_stale(j1) and f.stale == {}

    def test_a_source_that_never_resynced_is_fresh_at_connected(self) -> None:
        """A session that publishes no Resynced (it does not announce the end of its resyncs)
        is fresh again at its Connected."""
        f = Freshness([ev(Connected, 1), ev(StateChanged, 2, key="j"), ev(Disconnected, 3)])
        assert f.is_stale(ev(StateChanged, 2, key="j"))
        f.apply(ev(Connected, 4))
        assert not f.is_stale(ev(StateChanged, 2, key="j"))

    def test_disconnected_without_connected(self) -> None:
        """A session that could not reach its backend at start (Disconnected, no Connected
        before it) has the states an earlier run left stale."""
        f = Freshness([ev(StateChanged, 1, key="j"), ev(Disconnected, 2, reason="start failed")])
        assert f.is_stale(ev(StateChanged, 1, key="j"))

    def test_publisher_lost_makes_every_state_stale_until_back(self) -> None:
        """The broker's PublisherLost for a source makes all its states stale (a Disconnected
        too); PublisherBack ends it. Liveness events from anyone but the broker are ignored."""
        f = Freshness([ev(Connected, 1), ev(StateChanged, 2, key="j"), ev(Resynced, 3)])
        assert f.apply(lost(10, source="mallory")) is False
        assert not f.is_stale(ev(StateChanged, 2, key="j"))
        assert f.apply(lost(10)) is True
        st = f.staleness("s1")
        assert st is not None and st.since_seq is None and st.reason == "publisher lost"
        assert f.is_stale(ev(StateChanged, 99, key="j"))
        assert f.apply(lost(9, cls=PublisherBack)) is False  # older than the Lost: ignored
        assert f.apply(lost(11, cls=PublisherBack)) is True
        assert f.stale == {}

    def test_a_snapshot_in_any_order(self) -> None:
        """Fed a snapshot in any order, the tracker agrees with the live stream fed in order."""
        stream = [ev(Connected, 1), ev(StateChanged, 2, key="a"), ev(Resynced, 3), ev(StateChanged, 4, key="b"),
                  ev(Disconnected, 5), ev(Connected, 6), ev(StateChanged, 7, key="b", observed=Observed.RESYNC),
                  lost(1, key="s2"), ev(StateChanged, 1, source="s2", key="c")]
        live = Freshness(stream)
        # the latest of each slot, as a broker snapshot holds them
        latest: dict[str, Event] = {}
        for e in stream:
            latest[e.topic()] = e
        probes = [*latest.values(), ev(StateChanged, 2, key="a")]
        expected = [live.is_stale(p) for p in probes]
        assert expected == [False, True, False, False, False, True, True]
        for order in itertools.permutations(latest.values()):
            f = Freshness(order)
            assert [f.is_stale(p) for p in probes] == expected
            assert f.stale == live.stale

    def test_snapshot_entries_by_topic(self) -> None:
        """snapshot_staleness (what the broker runs, on topics and seqs) marks the same entries
        as the tracker does on events."""
        held = [ev(Connected, 1), ev(StateChanged, 2, key="/s/f/t"), ev(AttributeChanged, 3, key="/s/f/t",
                                                                           kind="meter", name="m", value=1),
                ev(Resynced, 4), ev(Disconnected, 5), ev(StateChanged, 1, source="s2", key="x")]
        snap = {e.topic(): e for e in held}  # the latest per slot: the Disconnected replaced the Connected
        stale, topics = snapshot_staleness([(e.topic(), e.source, e.seq) for e in snap.values()], snap.get)
        assert set(stale) == {"s1"} and stale["s1"].since_seq == 5
        assert topics == [held[1].topic(), held[2].topic()]
        f = Freshness(snap.values())
        assert [e.topic() for e in snap.values() if f.is_stale(e)] == topics

    def test_watch_prefixes(self) -> None:
        """A wait on part of a source also follows its session, resync and liveness slots."""
        assert watch_prefixes("ecflow/srv/state//s/t") == [
            "ecflow/srv/session/", "ecflow/srv/resync/", "flowbus/broker/bus/liveness/srv"]
        assert watch_prefixes("ecflow/srv/") == ["flowbus/broker/bus/liveness/srv"]
        assert watch_prefixes("ecflow/") == ["flowbus/broker/bus/liveness/"]
        assert watch_prefixes("") == [] and watch_prefixes("flowbus/") == []


# -- against a broker ----------------------------------------------------------------------------------


def session(bus: BusFactory, address: str, name: str = "s1") -> Publisher:
    """A publisher holding ``name`` as a flowbus session does (with a grant)."""
    pub = bus.publisher(address)
    pub.open_source(name, "qcg", grant=make_grant(bus.grant_key, name, "qcg"))
    return pub


def publish(pub: Publisher, *events: Event) -> None:
    pub.publish_many(list(events))
    pub.flush(5)


def sess(cls: type[Event], name: str = "s1", **fields: Any) -> Any:
    return cls(source=name, backend="qcg", **fields)


def raw_snapshot(address: str, prefix: str) -> dict[str, Any]:
    req = Requester(zmq.Context.instance(), address, None, 5.0)
    try:
        return req.call("snapshot", prefixes=[prefix])
    finally:
        req.close()


def cli(args: list[str], tmp_path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOWBUS_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run(FLOWBUS + args, env=env, capture_output=True, text=True, timeout=timeout)


def connected_with_jobs(bus: BusFactory) -> tuple[Any, Publisher]:
    broker = bus.broker()
    pub = session(bus, broker.address)
    publish(pub, sess(Connected, address="mgr"), state("s1", "j1", State.COMPLETE), state("s1", "j2", State.ACTIVE),
            sess(Resynced, changed=2, resources=2))
    return broker, pub


class TestStaleOnTheBus:
    def test_disconnected_session_is_stale_in_snapshot_status_and_waits(self, bus: BusFactory, tmp_path: Path) -> None:
        """The backend gone (Disconnected): the snapshot reply, Client.snapshot and `flowbus
        status` mark the session's states stale; a wait for a held state does not take it;
        after Connected and Resynced the same wait returns at once."""
        broker, pub = connected_with_jobs(bus)
        client = bus.client(broker.address)
        assert not client.snapshot("qcg/s1/").stale  # connected and resynced: all current
        assert client.wait("qcg/s1/state/j1 state=complete", timeout=5).seq == 2
        publish(pub, sess(Disconnected, reason="connection refused"))

        reply = raw_snapshot(broker.address, "qcg/s1/")
        assert sorted(reply["stale_topics"]) == ["qcg/s1/state/j1", "qcg/s1/state/j2"]
        assert reply["stale"]["s1"]["since_seq"] == 5 and reply["stale"]["s1"]["reason"] == "disconnected"

        snap = client.snapshot("qcg/s1/")
        assert {e.topic(): snap.is_stale(e) for e in snap.events} == {
            "qcg/s1/session/": False, "qcg/s1/resync/": False, "qcg/s1/state/j1": True, "qcg/s1/state/j2": True}
        assert [e.key for e in client.status("qcg/s1/state/")] == ["j1", "j2"]  # still listed

        r = cli(["status", "qcg/s1/", "--address", broker.address, "--json"], tmp_path)
        assert r.returncode == 0, r.stderr
        rows = {row["topic"]: row for row in json.loads(r.stdout)}
        assert rows["qcg/s1/state/j1"]["stale"] is True and rows["qcg/s1/session/"]["stale"] is False
        assert rows["qcg/s1/state/j1"]["staleness"]["detail"] == "connection refused"
        table = cli(["status", "qcg/s1/", "--address", broker.address], tmp_path).stdout.splitlines()
        assert "FRESHNESS" in table[0]
        marked = [line for line in table[1:] if "stale since" in line]
        assert [line.split()[2] for line in marked] == ["j1", "j2"]
        assert all(line.endswith("(disconnected: connection refused)") for line in marked)

        t0 = time.monotonic()
        with pytest.raises(WaitTimeout) as info:
            client.wait("qcg/s1/state/j1 state=complete", timeout=0.5)
        assert time.monotonic() - t0 >= 0.5
        assert "held but stale" in str(info.value) and "disconnected" in str(info.value)
        r = cli(["wait", "qcg/s1/state/j1 state=complete", "--address", broker.address, "--timeout", "0.5"], tmp_path)
        assert r.returncode == 124 and "stale" in r.stderr, r.stderr

        # the backend is back: Connected, nothing changed, Resynced; the waiter is woken by it
        timer = threading.Timer(0.3, publish, (pub, sess(Connected, address="mgr"), sess(Resynced, resources=2)))
        t0 = time.monotonic()
        timer.start()
        try:
            got = client.wait("qcg/s1/state/j1 state=complete", timeout=20)
        finally:
            timer.join()
        assert isinstance(got, StateChanged) and got.seq == 2 and time.monotonic() - t0 < 5
        assert not client.snapshot("qcg/s1/").stale
        r = cli(["wait", "qcg/s1/state/j1 state=complete", "--address", broker.address, "--timeout", "5"], tmp_path)
        assert r.returncode == 0, r.stderr

    def test_a_key_in_the_resync_diff_is_fresh_before_resynced(self, bus: BusFactory) -> None:
        """During a resync, a state in the diff counts at once; the others wait for Resynced."""
        broker, pub = connected_with_jobs(bus)
        client = bus.client(broker.address)
        publish(pub, sess(Disconnected, reason="lost"), sess(Connected, address="mgr"),
                state("s1", "j2", State.COMPLETE, observed=Observed.RESYNC, previous=State.ACTIVE))
        snap = client.snapshot("qcg/s1/state/")
        assert {e.key: snap.is_stale(e) for e in snap.events} == {"j1": True, "j2": False}
        assert snap.stale["s1"].reason == "resyncing"
        assert client.wait("qcg/s1/state/j2 state=complete", timeout=5).seq == 7
        with pytest.raises(WaitTimeout):
            client.wait("qcg/s1/state/j1 state=complete", timeout=0.5)
        with client.expect("qcg/s1/state/j1 state=complete", timeout=10) as w:
            publish(pub, sess(Resynced, changed=1, resources=2))
        assert w.event is not None and w.event.seq == 2

    def test_a_session_that_starts_disconnected(self, bus: BusFactory) -> None:
        """A new incarnation that cannot reach its backend publishes Disconnected with no
        Connected: what the journal held from the earlier one is stale."""
        broker, pub = connected_with_jobs(bus)
        pub.close(unregister=False)
        again = session(bus, broker.address)  # the session restarted (a new epoch)
        publish(again, sess(Disconnected, reason="start failed: connection refused", will_retry=True))
        snap = bus.client(broker.address).snapshot("qcg/s1/")
        assert sorted(e.key for e in snap.events if snap.is_stale(e)) == ["j1", "j2"]
        assert [e.incarnation for e in snap.events if isinstance(e, Disconnected)] == [2]

    def test_a_silent_publisher_is_stale_until_heard_also_across_a_broker_restart(
            self, bus: BusFactory, tmp_path: Path) -> None:
        """The broker's PublisherLost marks the source's states stale; a broker restarted on the
        journal keeps it lost, and PublisherBack (the source heard again) clears it."""
        journal = str(tmp_path / "journal")
        broker = bus.broker(journal_dir=journal, publisher_timeout=0.4)
        pub = session(bus, broker.address)
        publish(pub, sess(Connected), state("s1", "j1", State.COMPLETE), sess(Resynced, resources=1))
        sub = bus.subscriber(broker.address, "flowbus/broker/bus/liveness/s1")
        pub.close(unregister=False)  # as if the session's process died
        assert [type(e) for e in collect(sub, 1, timeout=10)] == [PublisherLost]
        client = bus.client(broker.address)
        assert client.snapshot("qcg/s1/").stale["s1"].reason == "publisher lost"
        with pytest.raises(WaitTimeout):
            client.wait("qcg/s1/state/j1 state=complete", timeout=0.3)
        broker.stop()

        again = bus.broker(journal_dir=journal, publisher_timeout=0.4)
        client = bus.client(again.address)
        assert client.snapshot("qcg/s1/").stale["s1"].reason == "publisher lost"
        with client.expect("qcg/s1/state/j1 state=complete", timeout=10) as w:
            session(bus, again.address)  # the session is back: its heartbeats bring PublisherBack
        assert w.event is not None and w.event.seq == 2
        assert client.snapshot("qcg/s1/").stale == {}
        assert client.stats()["lost"] == []
