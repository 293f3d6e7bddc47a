"""The broker's trust rules, one at a time: source grants and owners, holders, range checks,
bounded input, the command socket's worker proof, read-only CurveZMQ keys, private ipc sockets.
(tests/cli/test_trust.py tries them all together against the real embedded default.)"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any, cast

import pytest
import zmq

from flowbus.bus import ClientCurve, CommandServer, ensure_grant_key, load_grant_key, make_grant, make_keypair
from flowbus.bus import _framing as fr
from flowbus.schemas import (
    BackendRejected,
    BusBroken,
    BusConfig,
    ConfigError,
    CurveConfig,
    ErrorEvent,
    SourceRefused,
    State,
    UnknownSession,
    encode,
)
from support.bus import (
    BusFactory,
    ThreadBroker,
    bus_config,
    bus_fixture,  # noqa: F401 - provides the `bus` fixture
    collect,
    state,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return ensure_grant_key(tmp_path / "keys" / "grant.key")


def _register(bus: BusFactory, broker: ThreadBroker, fields: list[Any]) -> tuple[bytes, Any]:
    sock = bus.raw(zmq.DEALER, broker.endpoints["ingest"])
    sock.send_multipart([fr.REGISTER, fr.pack(fields)])
    assert sock.poll(5000), "every registration is answered"
    kind, body = sock.recv_multipart()
    return kind, fr.unpack(body)


class TestSourceGrants:
    def test_a_sessions_source_is_refused_to_anyone_without_its_grant(self, bus: BusFactory, key_file: Path) -> None:
        """Once a session opened its source with a grant, a publisher without one is refused,
        naming the owner, and the session goes on publishing."""
        broker = bus.broker(grant_key_file=str(key_file))
        session = bus.publisher(broker.address)
        session.open_source("local", "qcg", grant=make_grant(load_grant_key(key_file), "local", "qcg"))
        stranger = bus.publisher(broker.address)
        with pytest.raises(SourceRefused, match="source 'local' belongs to session qcg/local"):
            stranger.open_source("local", "qcg")
        assert stranger.refusals()["local"].endswith("[owned]")
        session.publish(state("local", "j", State.COMPLETE))
        session.flush(5)
        assert [e.incarnation for e in bus.client(broker.address).status("qcg/local/")] == [1]

    def test_a_grant_made_with_another_key_is_refused(self, bus: BusFactory, key_file: Path, tmp_path: Path) -> None:
        """A grant signed with any other key (or for another source) does not open the source."""
        broker = bus.broker(grant_key_file=str(key_file))
        other = load_grant_key(ensure_grant_key(tmp_path / "other.key"))
        pub = bus.publisher(broker.address)
        with pytest.raises(SourceRefused, match=r"not valid for this broker's key \[bad_grant\]"):
            pub.open_source("local", "qcg", grant=make_grant(other, "local", "qcg"))
        with pytest.raises(SourceRefused, match="bad_grant"):
            pub.open_source("local", "qcg", grant=make_grant(load_grant_key(key_file), "elsewhere", "qcg"))

    def test_a_grant_at_a_broker_without_a_key_is_a_clear_error(self, bus: BusFactory, key_file: Path) -> None:
        """A broker that checks no grants says so instead of taking the grant on trust."""
        broker = bus.broker(grant_key_file="")
        with pytest.raises(SourceRefused, match="grant-key-file is not set"):
            bus.publisher(broker.address).open_source("s", "qcg", grant=make_grant(load_grant_key(key_file), "s", "qcg"))

    def test_the_owner_survives_a_broker_restart(self, bus: BusFactory, key_file: Path) -> None:
        """The journal keeps who owns a source: after a restart it is still refused to others."""
        proc = bus.broker_process(grant_key_file=str(key_file))
        session = bus.publisher(proc.address)
        session.open_source("local", "qcg", grant=make_grant(load_grant_key(key_file), "local", "qcg"))
        session.publish(state("local", "j"))
        session.flush(5)
        proc.stop()
        proc.start()
        with pytest.raises(SourceRefused, match="belongs to session qcg/local"):
            bus.publisher(proc.address).open_source("local", "qcg")


class TestHolders:
    def test_a_live_user_source_cannot_be_taken_and_is_free_once_closed(self, bus: BusFactory) -> None:
        """A second publisher cannot take a user source while its holder is live; once the
        holder closes it, it opens as the next incarnation."""
        broker = bus.broker()
        first = bus.source(broker.address, "mine")
        second = bus.publisher(broker.address)
        with pytest.raises(SourceRefused, match=r"open on another publisher.*\[in_use\]"):
            second.open_source("mine", "qcg")
        first.close()
        assert second.open_source("mine", "qcg") == (2, 1)

    def test_a_silent_holder_frees_its_source(self, bus: BusFactory) -> None:
        """A holder that died (no goodbye) frees its source once reported lost."""
        broker = bus.broker(publisher_timeout=0.3)
        sub = bus.subscriber(broker.address, "flowbus/broker/bus/liveness/")
        first = bus.source(broker.address, "mine")
        first.close(unregister=False)
        collect(sub, 1)  # PublisherLost
        assert bus.publisher(broker.address).open_source("mine", "qcg") == (2, 1)

    def test_data_and_goodbyes_from_another_connection_are_not_taken(self, bus: BusFactory) -> None:
        """Events for a source from a connection that did not register it never reach the journal,
        and its unregistration does not end the holder's liveness."""
        broker = bus.broker()
        holder = bus.source(broker.address, "s1")
        holder.publish(state("s1", "real"))
        holder.flush(5)
        forged = state("s1", "forged", seq=2, incarnation=1)
        raw = bus.raw(zmq.DEALER, broker.endpoints["ingest"])
        raw.send_multipart([fr.DATA, fr.pack_data("s1", 1, 2, [encode(forged)])])
        raw.send_multipart([fr.UNREGISTER, fr.pack(["s1", 1])])
        holder.publish(state("s1", "real2"))
        holder.flush(5)
        client = bus.client(broker.address)
        # the forged frames come on another connection: the broker may take them after the
        # holder's; wait (bounded) until it has counted them, then look at what it kept
        deadline = time.monotonic() + 10
        while (stats := client.stats()["stats"]).get("foreign", 0) < 1 and time.monotonic() < deadline:
            raw.poll(50)  # a bounded pause between two looks at the counters
        assert stats["malformed.foreign"] >= 1 and stats["foreign"] >= 1
        assert sorted(e.key for e in client.status("qcg/s1/")) == ["real", "real2"]
        assert client.marks()["s1"][2] == 2


class TestRanges:
    @pytest.mark.parametrize("fields", [
        ["s", "qcg", 2**64 - 1, 0, 0], ["s", "qcg", 0, 2**63, 0], ["s", "qcg", -1, 0, 0], ["s", "qcg", 1.5, 0, 0],
        ["s", "qcg", 0, 0, 0, "not a grant"], ["x" * 500, "qcg", 0, 0, 0], ["s", "q\ncg", 0, 0, 0],
    ], ids=["epoch-2^64", "acked-2^63", "negative", "float", "junk-grant", "long-name", "control-char"])
    def test_absurd_registrations_are_refused_and_the_broker_restarts(self, bus: BusFactory, fields: list[Any]) -> None:
        """Out-of-range numbers and bad names are refused with a reason; nothing reaches the
        journal, and the broker restarts from it (no --fresh needed)."""
        proc = bus.broker_process()
        sock = bus.raw(zmq.DEALER, proc.endpoints["ingest"])
        sock.send_multipart([fr.REGISTER, fr.pack(fields)])
        assert sock.poll(5000)
        kind, body = sock.recv_multipart()
        assert kind == fr.REFUSED, fr.unpack(body)
        proc.stop()
        proc.start()
        client = bus.client(proc.address)
        assert set(client.marks()) == {"broker"}


class TestBoundedInput:
    def test_oversized_frames_and_topics_are_refused_by_the_transport(self, bus: BusFactory) -> None:
        """A frame over max-frame-bytes and a topic over max-topic-bytes never reach the broker's
        loop; it keeps serving the others."""
        broker = bus.broker(max_frame_bytes=64 * 1024, max_topic_bytes=64)
        raw = bus.raw(zmq.DEALER, broker.endpoints["ingest"])
        raw.send_multipart([fr.DATA, b"\0" * (1024 * 1024)])
        sub = bus.subscriber(broker.address, "q" * 32)
        sub.close()
        greedy = bus.raw(zmq.SUB, broker.endpoints["publish"])
        greedy.setsockopt(zmq.SUBSCRIBE, b"t" * 1000)
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "j"))
        pub.flush(5)
        stats = bus.client(broker.address).stats()
        assert not any(len(t) > 64 for t in stats["subscriptions"])
        assert stats["stats"]["received"] == 1

    def test_subscription_topics_kept_are_bounded(self, bus: BusFactory) -> None:
        """Beyond max-subscriptions distinct topics the broker keeps no more (and says so)."""
        broker = bus.broker(max_subscriptions=3)
        subs = [bus.raw(zmq.SUB, broker.endpoints["publish"]) for _ in range(5)]
        for i, s in enumerate(subs):
            s.setsockopt(zmq.SUBSCRIBE, f"topic{i}/".encode())
        deadline = time.monotonic() + 10
        client = bus.client(broker.address)
        while client.stats()["stats"].get("malformed.too_many_subscriptions", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # subscriptions travel asynchronously; each stats() is the event awaited
        stats = client.stats()
        assert len(stats["subscriptions"]) == 3
        assert stats["stats"]["malformed.too_many_subscriptions"] >= 2


class TestCommands:
    def test_a_call_goes_to_the_worker_and_errors_come_back_as_ours(self, bus: BusFactory, key_file: Path) -> None:
        """Client.call reaches the serving worker; its errors keep their flowbus type."""
        broker = bus.broker(grant_key_file=str(key_file))

        def handler(req: dict[str, Any]) -> Any:
            if req["session"] != "local":
                raise UnknownSession(req["session"])
            if req["operation"] == "bad":
                raise BackendRejected("bad: no such job 'x'")
            return {"op": req["operation"], "args": req["args"], "kwargs": req["kwargs"]}

        server = CommandServer(broker.endpoints["command"], handler, grant_key=load_grant_key(key_file))
        try:
            client = bus.client(broker.address)
            assert client.call("local", "list", [1, "a"], {"k": True}, timeout=10) == \
                {"op": "list", "args": [1, "a"], "kwargs": {"k": True}}
            with pytest.raises(UnknownSession, match="no session named 'nope'"):
                client.call("nope", "list", timeout=10)
            with pytest.raises(BackendRejected, match="no such job"):
                client.call("local", "bad", timeout=10)
        finally:
            server.close()

    def test_without_a_worker_a_call_fails_in_bounded_time(self, bus: BusFactory) -> None:
        """With nothing serving commands, a call says so (after the grace for a restarting worker)."""
        broker = bus.broker(grant_key_file="")
        with pytest.raises(BusBroken, match="no `flowbus up` serves commands"):
            bus.client(broker.address).call("local", "list", timeout=5)

    def test_a_worker_without_the_key_cannot_take_commands(self, bus: BusFactory, key_file: Path,
                                                           tmp_path: Path) -> None:
        """Only a worker that proves it holds the bus's grant key is sent commands."""
        broker = bus.broker(grant_key_file=str(key_file))
        impostor = CommandServer(broker.endpoints["command"], lambda req: "stolen",
                                 grant_key=load_grant_key(ensure_grant_key(tmp_path / "x.key")))
        try:
            with pytest.raises(BusBroken, match="no `flowbus up` serves commands"):
                bus.client(broker.address).call("local", "list", timeout=5)
        finally:
            impostor.close()
        assert bus.client(broker.address).stats()["stats"]["malformed.bad_worker"] >= 1


class TestReadOnlyKeys:
    def test_a_reader_key_subscribes_but_cannot_publish(self, bus: BusFactory, tmp_path: Path) -> None:
        """A key in readers-keys-dir gets events and snapshots; the ingest socket does not admit it."""
        keys = tmp_path / "keys"
        server_public, server_secret = make_keypair(keys, "server")
        owner_public, owner_secret = make_keypair(keys, "owner")
        reader_public, reader_secret = make_keypair(keys, "reader")
        owners, readers = tmp_path / "owners", tmp_path / "readers"
        owners.mkdir()
        readers.mkdir()
        shutil.copy(owner_public, owners / "owner.key")
        shutil.copy(reader_public, readers / "reader.key")
        broker = bus.broker(curve=CurveConfig(server_secret_key_file=str(server_secret),
                                              authorized_keys_dir=str(owners), readers_keys_dir=str(readers)))

        def curve(secret: Path) -> ClientCurve:
            c = ClientCurve.from_config(CurveConfig(server_public_key_file=str(server_public),
                                                    client_secret_key_file=str(secret)))
            assert c is not None
            return c

        owner = bus.publisher(broker.address, curve=curve(owner_secret))
        owner.open_source("s1", "qcg")
        owner.publish(state("s1", "j"))
        owner.flush(5)
        reader = bus.client(broker.address, curve=curve(reader_secret))
        assert [e.key for e in reader.status("qcg/s1/")] == ["j"]
        with pytest.raises(BusBroken):
            bus.publisher(broker.address, curve=curve(reader_secret), timeout=2.0).open_source("r", "qcg", timeout=2.0)


class TestIpc:
    def test_sockets_are_private(self, bus: BusFactory, tmp_path: Path) -> None:
        """The ipc directory is 0700 and its sockets 0600; ingest and command sit in owner/."""
        broker = bus.broker(BusConfig(ipc_dir=str(tmp_path / "bus"), heartbeat_interval=0.1))
        base = tmp_path / "bus"
        assert stat.S_IMODE(base.stat().st_mode) == 0o700
        assert stat.S_IMODE((base / "owner").stat().st_mode) == 0o700
        for path in (base / "request", base / "publish", base / "owner" / "ingest", base / "owner" / "command"):
            assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert broker.endpoints["ingest"] == f"ipc://{base / 'owner' / 'ingest'}"
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "j"))
        pub.flush(5)

    @pytest.mark.skipif(os.getuid() != 0, reason="chown to another group needs root")
    def test_a_group_may_read_but_not_write(self, bus: BusFactory, tmp_path: Path) -> None:
        """With ipc-group the directory and read sockets are the group's; owner/ stays private."""
        group = grp.getgrgid(65534).gr_name
        bus.broker(BusConfig(ipc_dir=str(tmp_path / "bus"), ipc_group=group, heartbeat_interval=0.1))
        base = tmp_path / "bus"
        assert base.stat().st_gid == 65534 and stat.S_IMODE(base.stat().st_mode) == 0o750
        assert stat.S_IMODE((base / "request").stat().st_mode) == 0o660
        assert stat.S_IMODE((base / "owner").stat().st_mode) == 0o700

    def test_tcp_on_loopback_without_curve_is_refused_by_default(self) -> None:
        """Plain TCP is refused even on 127.0.0.1 unless insecure-loopback says otherwise."""
        from flowbus.bus import Broker

        broker = Broker(bus_config(insecure_loopback=False))
        with pytest.raises(OSError, match="every local user reaches loopback"):
            broker.bind()
        broker.close()

    def test_an_unknown_group_is_a_config_error(self, tmp_path: Path) -> None:
        """A misspelt ipc-group fails at bind, naming the key."""
        from flowbus.bus import Broker

        broker = Broker(BusConfig(ipc_dir=str(tmp_path / "bus"), ipc_group="no-such-group-xyz"))
        with pytest.raises(ConfigError, match=r"bus.ipc-group: no Unix group named"):
            broker.bind()


class TestJournalDamage:
    def test_damage_is_published_and_the_rest_is_kept(self, bus: BusFactory) -> None:
        """A broker restarted on a journal with flipped bytes publishes a JournalDamaged error
        naming the file offset, and replays every intact event after the damage."""
        proc = bus.broker_process()
        pub = bus.source(proc.address, "s1")
        for i in range(20):  # one frame (one journal record) per event: the damage hits one event
            pub.publish(state("s1", f"j{i}"))
            pub.flush(5)
        pub.close()
        proc.stop()
        path = Path(proc.journal_dir or "") / "journal.000001"
        data = bytearray(path.read_bytes())
        at = data.index(b"j10")  # inside the event record of job j10
        data[at:at + 3] = b"\xff\xfe\xfd"
        path.write_bytes(bytes(data))
        proc.start()
        sub = bus.subscriber(proc.address, "", start="journal")
        got = collect(sub, 22, timeout=10)  # 19 intact + 1 filler for s1, and the broker's report
        errors = [cast(ErrorEvent, e) for e in got if getattr(e, "error_type", "") == "flowbus.bus.JournalDamaged"]
        assert any(e.source == "broker" and "offset" in e.message for e in errors), errors
        assert any(e.source == "s1" and e.seq == 11 for e in errors), errors
        keys = sorted(e.key for e in got if e.source == "s1" and getattr(e, "state", None) is not None)
        assert keys == sorted(f"j{i}" for i in range(20) if i != 10)


class TestForgedEvents:
    """The broker forwards and journals a publisher's indexed frame without decoding it; the
    subscriber checks each event against the broker's header (source, backend, epoch, seq), and
    replay and snapshot answers against what the journal filed. A forged event never arrives as
    itself: its slot is an ``InvalidEvent`` error, so the source's seqs stay gapless."""

    def _plant(self, bus: BusFactory, broker: Any) -> None:
        """The holder of ``s1`` (a raw connection that registered it) sends a frame whose second
        event claims source ``s2`` and whose third claims a seq the frame does not give it."""
        raw = bus.raw(zmq.DEALER, broker.endpoints["ingest"])
        raw.send_multipart([fr.REGISTER, fr.pack(["s1", "qcg", 0, 0, 0])])
        assert raw.poll(5000)
        kind, body = raw.recv_multipart()
        assert kind == fr.WELCOME, fr.unpack(body)
        events = [state("s1", "a", seq=1, incarnation=1), state("s2", "b", seq=2, incarnation=1),
                  state("s1", "c", seq=7, incarnation=1), state("s1", "d", seq=4, incarnation=1)]
        # the index claims what the frame should be: every topic under qcg/s1/
        topics = ["qcg/s1/state/a", "qcg/s1/state/b", "qcg/s1/state/c", "qcg/s1/state/d"]
        raw.send_multipart([fr.DATA, fr.pack_data("s1", 1, 1, [encode(e) for e in events], topics, b"\x01" * 4)])
        assert raw.poll(5000)
        kind, body = raw.recv_multipart()
        assert kind == fr.ACK and fr.unpack(body)[1] == [["s1", 1, 4]], "journaled whole, undecoded"

    @staticmethod
    def _check(got: list[Any]) -> None:
        assert [e.seq for e in got] == [1, 2, 3, 4] and all(e.source == "s1" for e in got)
        assert [e.key for e in got if not isinstance(e, ErrorEvent)] == ["a", "d"]
        bad = [e for e in got if isinstance(e, ErrorEvent)]
        assert [e.error_type for e in bad] == ["flowbus.bus.InvalidEvent"] * 2
        assert "qcg/s2#2" in bad[0].message and "s1#3" in bad[1].message, [e.message for e in bad]

    def test_a_planted_event_is_refused_live_in_replay_and_in_the_snapshot(self, bus: BusFactory) -> None:
        broker = bus.broker()
        live = bus.subscriber(broker.address, "qcg/s1/")
        self._plant(bus, broker)
        self._check(collect(live, 4))
        stats = live.statistics()
        assert stats["forged"] == 2 and stats["delivered"] == 4
        # the journal holds the bytes as sent: a late joiner's replay is checked the same way
        late = bus.subscriber(broker.address, "qcg/s1/", start="journal")
        self._check(collect(late, 4))
        assert late.statistics()["forged"] == 2
        # the snapshot slots the index claimed: only entries whose event is what they were filed as
        assert sorted(e.key for e in bus.client(broker.address).status("qcg/")) == ["a", "d"]
        snap = bus.subscriber(broker.address, "qcg/", start="snapshot")
        assert sorted(e.key for e in collect(snap, 2)) == ["a", "d"]
        assert snap.statistics()["forged"] == 2

    def test_an_index_outside_the_source_is_refused_and_the_frame_decoded(self, bus: BusFactory) -> None:
        """A topic not under the source's prefix: the broker refuses the index (counted, logged)
        and checks each event itself, as for a frame without an index."""
        broker = bus.broker()
        live = bus.subscriber(broker.address, "")
        raw = bus.raw(zmq.DEALER, broker.endpoints["ingest"])
        raw.send_multipart([fr.REGISTER, fr.pack(["s1", "qcg", 0, 0, 0])])
        assert raw.poll(5000) and raw.recv_multipart()[0] == fr.WELCOME
        ev = state("s1", "a", seq=1, incarnation=1)
        raw.send_multipart([fr.DATA, fr.pack_data("s1", 1, 1, [encode(ev)], ["qcg/s2/state/a"], b"\x01")])
        got = collect(live, 1, keep=lambda e: e.source == "s1")
        assert [(e.key, e.topic()) for e in got] == [("a", "qcg/s1/state/a")]
        stats = bus.client(broker.address).stats()["stats"]
        assert stats["malformed.bad_index"] == 1
        assert [e.topic() for e in bus.client(broker.address).status("qcg/")] == ["qcg/s1/state/a"]
