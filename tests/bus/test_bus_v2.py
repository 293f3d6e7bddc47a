"""Bus v2 behaviour: back-pressure at a full window, frames forwarded whole, no spurious replays,
the journal's fsync policy."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from flowbus.bus import Client, Journal
from flowbus.schemas import BusBroken, ConfigError, PublishBackedUp, StateChanged, parse_config
from support.bus import (
    BusFactory,
    bus_fixture,  # noqa: F401 - provides the `bus` fixture
    collect,
    seqs_of,
    state,
)

pytestmark = pytest.mark.timeout(60)


class TestBackPressure:
    def test_window_full_raises_then_nothing_is_lost(self, bus: BusFactory) -> None:
        """With the broker stopped, publish() blocks at ``max_unacked`` and raises PublishBackedUp
        (a BusBroken) without queueing; once the broker runs again every event queued arrives once."""
        broker = bus.broker_process()
        sub = bus.subscriber(broker.address, "qcg/bp/")
        pub = bus.source(broker.address, "bp", max_unacked=50, block_timeout=0.3)
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            for i in range(50):
                pub.publish(state("bp", f"j{i}"))
            with pytest.raises(PublishBackedUp, match=r"source 'bp': 50 events not acknowledged") as info:
                pub.publish(state("bp", "one-too-many"))
            assert isinstance(info.value, BusBroken)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        pub.publish(state("bp", "after"))  # room again once the broker acks
        pub.flush(10)
        got = collect(sub, 51, timeout=20)
        assert seqs_of(got, "bp") == list(range(1, 52))
        assert [e.key for e in got][-2:] == ["j49", "after"]
        assert pub.stats["published"] == 51 and pub.stats["waited"] >= 1


class TestFrames:
    def test_a_batch_reaches_wide_and_narrow_subscribers(self, bus: BusFactory) -> None:
        """A publisher's frame goes to a subscriber of the whole source as one frame, and event by
        event where a narrower subscription exists; both get exactly their events, in order."""
        broker = bus.broker()
        wide = bus.subscriber(broker.address, "qcg/f1/")
        pub = bus.source(broker.address, "f1", batch_max=100)
        pub.publish_many([state("f1", f"j{i % 10}") for i in range(100)])
        pub.flush(5)
        got = collect(wide, 100)
        assert seqs_of(got, "f1") == list(range(1, 101))
        assert wide.statistics()["received"] == 1  # the publisher's frame, forwarded whole

        narrow = bus.subscriber(broker.address, "qcg/f1/state/j3")
        pub.publish_many([state("f1", f"j{i % 10}") for i in range(100)])
        pub.flush(5)
        assert seqs_of(collect(wide, 100), "f1") == list(range(101, 201))
        only = collect(narrow, 10)
        assert [e.seq for e in only] == [104 + 10 * i for i in range(10)]
        assert all(isinstance(e, StateChanged) and e.key == "j3" for e in only)
        assert narrow.recv(0.2) is None

    def test_a_clean_burst_replays_nothing(self, bus: BusFactory) -> None:
        """Events still queued for a subscriber when it first hears a tick are not replayed: the
        marks it asks for then are acted on only after a later tick. Nothing replayed, every event once."""
        broker = bus.broker()
        client = bus.client(broker.address)
        subs = [bus.subscriber(broker.address, "qcg/clean/") for _ in range(2)]
        pub = bus.source(broker.address, "clean")
        n = 10_000
        for half in (0, n // 2):  # the subscribers read nothing yet: a tick is queued between the halves
            ticks = self._ticks(client)
            for i in range(half, half + n // 2, 500):
                pub.publish_many([state("clean", f"j{k}") for k in range(i, i + 500)])
            pub.flush(20)
            self._await_tick(client, ticks)
        for sub in subs:
            assert seqs_of(collect(sub, n, timeout=30), "clean") == list(range(1, n + 1))
            # the subscriber hands events out before reading further: let it read the ticks after
            # them too (a second ok: ticks come every 0.2 s), and still nothing may be replayed
            assert sub.recv(1.0) is None
            stats = sub.statistics()
            assert stats["ticks"] >= 2
            assert (stats["replayed"], stats["gaps"], stats["duplicates"]) == (0, 0, 0)

    @staticmethod
    def _ticks(client: Client) -> int:
        stats = client.stats()["stats"]
        return int(stats.get("ticks_full", 0)) + int(stats.get("ticks_delta", 0))

    def _await_tick(self, client: Client, before: int) -> None:
        deadline = time.monotonic() + 10
        while self._ticks(client) <= before:
            assert time.monotonic() < deadline, "no broker tick within 10 s"
            client.stats()  # one request round trip between two looks


class TestJournalFsync:
    def _write(self, journal: Journal, count: int) -> None:
        src = journal.register("s", "qcg", 1, 0)
        for seq in range(1, count + 1):
            journal.append(src, seq, f"qcg/s/state/j{seq}", True, b"\x80")
            journal.flush()

    @pytest.mark.parametrize(("policy", "interval", "fsyncs"),
                             [("none", 1.0, 0), ("always", 1.0, 3), ("interval", 0.0, 3), ("interval", 3600.0, 1)])
    def test_policies(self, tmp_path: Path, policy: str, interval: float, fsyncs: int) -> None:
        """``always`` syncs every flush that wrote, ``interval`` at most once per interval (and at
        close), ``none`` never; what was written loads back either way."""
        journal = Journal(100, tmp_path, fsync=policy, fsync_interval=interval)
        self._write(journal, 3)
        journal.sync_due()
        journal.close()
        assert journal.fsyncs == fsyncs
        again = Journal(100, tmp_path)
        src = again.source("s")
        assert src is not None and src.last_seq == 3
        again.close()

    def test_unknown_policy_is_refused(self, tmp_path: Path) -> None:
        """A policy the journal does not know is an error naming it, in the config and the journal."""
        with pytest.raises(ValueError, match="journal fsync policy 'sometimes'"):
            Journal(100, tmp_path, fsync="sometimes")
        with pytest.raises(ConfigError, match="journal-fsync"):
            parse_config({"bus": {"journal-fsync": "sometimes"}}, "/etc/flowbus.toml")
        cfg = parse_config({"bus": {"journal-fsync": "always", "journal-fsync-interval": 0.5}}, "/etc/flowbus.toml")
        assert (cfg.bus.journal_fsync, cfg.bus.journal_fsync_interval) == ("always", 0.5)

    def test_broker_counts_fsyncs(self, bus: BusFactory, tmp_path: Path) -> None:
        """A broker with ``journal-fsync = "always"`` syncs before acking and reports it in stats."""
        broker = bus.broker(journal_dir=str(tmp_path / "j"), journal_fsync="always")
        pub = bus.source(broker.address, "fs")
        for i in range(3):
            pub.publish(state("fs", f"j{i}"))
            pub.flush(5)
        stats = bus.client(broker.address).stats()["stats"]
        assert stats["journal_fsyncs"] >= 3
