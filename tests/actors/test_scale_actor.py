"""Many sessions per actor: the poll scheduler (bounded workers, stuck polls), batched opening of
many real ecFlow sessions in one BackendActorImpl, and the broker's delta ticks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from flowbus.actors._scheduler import PollScheduler
from flowbus.bus import Publisher, Subscriber
from flowbus.bus import _framing as fr
from flowbus.bus._broker import FULL_TICK_EVERY
from flowbus.schemas import AttributeChanged, EcflowSessionConfig, Heartbeat, State, StateChanged
from support import ecflow as _fx
from support import poll
from support.ecflow import EcfServer

ecf_server = _fx.ecf_server


class TestPollScheduler:
    @pytest.mark.timeout(60)
    def test_stuck_polls_fewer_than_workers_do_not_stall_the_others(self) -> None:
        """3 of 4 workers blocked in polls: 20 other jobs are still polled every ~20 ms, the
        blocked ones are not rescheduled while in flight, and stuck() names them."""
        release = threading.Event()
        stuck_runs = {f"stuck{i}": 0 for i in range(3)}
        runs: dict[str, list[float]] = {f"ok{i}": [] for i in range(20)}

        def blocking(key: str) -> Callable[[], float]:
            def job() -> float:
                stuck_runs[key] += 1
                release.wait(30)
                return 0.01
            return job

        def quick(key: str) -> Callable[[], float]:
            def job() -> float:
                runs[key].append(time.monotonic())
                return 0.02
            return job

        sched = PollScheduler(4, name="t", stuck_after=0.3)
        try:
            for key in stuck_runs:
                sched.add(key, blocking(key))
            poll.until(lambda: all(stuck_runs.values()), 10, "the blocking jobs to start", every=0.01)
            for key in runs:
                sched.add(key, quick(key))
            t0 = time.monotonic()
            poll.until(lambda: all(len([t for t in v if t > t0]) >= 10 for v in runs.values()), 30,
                   "every other job to run 10 times", every=0.01)
            poll.until(lambda: set(sched.stuck()) == set(stuck_runs), 10, "stuck() to name the blocked jobs", every=0.01)
            assert stuck_runs == dict.fromkeys(stuck_runs, 1), "a job in flight was started again"
            assert sched.info()["busy"] >= 3
            # removing a blocked job times out (its poll is still running) but it never runs again
            assert sched.remove("stuck0", timeout=0.2) is False
            release.set()
            poll.until(lambda: not sched.in_flight() or set(sched.in_flight()) <= set(runs), 10, "the polls to return", every=0.01)
            poll.until(lambda: stuck_runs["stuck1"] >= 2, 10, "a released job to run again", every=0.01)
            assert stuck_runs["stuck0"] == 1
        finally:
            release.set()
            sched.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("t-")], "scheduler threads left"

    @pytest.mark.timeout(60)
    def test_a_failing_job_is_rescheduled_and_counted(self) -> None:
        calls = []

        def job() -> float:
            calls.append(time.monotonic())
            raise RuntimeError("boom")

        sched = PollScheduler(1, name="f", max_delay=0.05)
        try:
            sched.add("j", job)
            poll.until(lambda: len(calls) >= 3, 10, "three runs of a failing job", every=0.01)
            assert sched.info()["errors"] >= 3
            with pytest.raises(ValueError, match="already scheduled"):
                sched.add("j", job)
        finally:
            sched.close()

    @pytest.mark.timeout(60)
    def test_a_job_can_remove_itself(self) -> None:
        """remove() from inside the job's own run returns at once; the job never runs again."""
        calls: list[bool] = []
        sched = PollScheduler(2, name="r")
        try:
            sched.add("self", lambda: calls.append(sched.remove("self", timeout=30)) or 0.01)  # type: ignore[func-returns-value]  # append, then the delay
            poll.until(lambda: bool(calls), 10, "the job to run", every=0.01)
            ran = sched.stats["runs"]
            sched.add("other", lambda: 0.01)
            poll.until(lambda: sched.stats["runs"] >= ran + 5, 10, "another job to run", every=0.01)
            assert calls == [True], "remove() inside the job returned at once and the job ran once"
        finally:
            sched.close()

    def test_bad_worker_count_is_a_clear_error(self) -> None:
        with pytest.raises(ValueError, match="workers must be >= 1"):
            PollScheduler(0)


class TestManySessionsInOneActor:
    @pytest.mark.timeout(300)
    def test_many_ecflow_sessions_open_in_one_batch_and_report_changes(
            self, broker_factory: Any, ecf_server: Callable[..., EcfServer]) -> None:
        """60 real sessions over 3 real servers in one actor body with 4 poll workers: every
        session opens (one registration round, one snapshot), a change on each server reaches a
        subscriber from every session watching it, ping() shows the scheduler and nothing stuck,
        and removing a session stops its polls."""
        from flowbus.actors import _backend_actor as ba

        broker = broker_factory()
        servers = [ecf_server() for _ in range(3)]
        for s in servers:
            path = s.home / "s.def"
            path.write_text("suite s\n  task t\n    label info \"\"\nendsuite\n")
            s.client().load(_fx.ecflow.Defs(str(path)))
        n = 60
        specs = []
        for i in range(n):
            spec = msgspec.to_builtins(EcflowSessionConfig(name=f"e{i}", host="127.0.0.1",
                                                           port=servers[i % 3].port, poll_interval=0.2))
            spec["backend"] = "ecflow"
            specs.append(spec)
        loop = asyncio.new_event_loop()
        impl = ba.BackendActorImpl("many", broker.address, specs, poll_workers=4, open_concurrency=4)
        sub = Subscriber(broker.address, "ecflow/", start="live")
        try:
            info = loop.run_until_complete(asyncio.wait_for(impl.start(), 120))
            assert len(info["sessions"]) == n
            assert info["stuck"] == {} and info["scheduler"]["workers"] == 4
            for k, s in enumerate(servers):
                s.client().alter("/s/t", "change", "label", "info", f"v{k}")
            want = {(f"e{i}", f"v{i % 3}") for i in range(n)}
            got: set[tuple[str, str]] = set()
            deadline = time.monotonic() + 60
            while want - got and time.monotonic() < deadline:
                for ev in sub.recv_many(0.5):
                    if isinstance(ev, AttributeChanged) and ev.name == "info" and ev.key == "/s/t":
                        got.add((ev.source, str(ev.value)))
            assert not want - got, f"no change seen from {sorted(want - got)[:5]}"
            loop.run_until_complete(impl.remove_session("e0"))
            assert impl._scheduler is not None and impl._scheduler.info()["scheduled"] == n - 1
            assert "e0" not in loop.run_until_complete(impl.ping())["sessions"]
            sched = impl._scheduler
            runs = sched.stats["runs"]
            poll.until(lambda: sched.stats["runs"] > runs + 50, 30, "the other sessions to keep polling", every=0.01)
        finally:
            sub.close()
            try:
                loop.run_until_complete(asyncio.wait_for(impl.stop(), 120))
            finally:
                impl._pool.shutdown(wait=True)
                loop.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("flowbus-many")], "threads left"


class TestStuckSessionInOneActor:
    @pytest.mark.timeout(240)
    def test_a_frozen_manager_holds_one_worker_and_is_reported_stuck(self, broker_factory: Any, tmp_path: Any) -> None:
        """Two real QCG sessions on two poll workers: the frozen one's poll blocks (SIGSTOP), ping()
        names it under ``stuck``, and the other session's events still flow on the other worker."""
        import os
        import signal

        import psutil

        from flowbus.actors import _backend_actor as ba
        from flowbus.bus import Client
        from flowbus.schemas import QcgSessionConfig

        broker = broker_factory()
        # no liveness probe: its verdict would end the frozen session's blocked poll within 1.6 s
        specs = [msgspec.to_builtins(QcgSessionConfig(name="frozen", wd=str(tmp_path / "a"), recovery="none",
                                                      request_timeout=20.0, reconcile_interval=0.2,
                                                      liveness_interval=0)),
                 msgspec.to_builtins(QcgSessionConfig(name="lively", wd=str(tmp_path / "b")))]
        loop = asyncio.new_event_loop()
        impl = ba.BackendActorImpl("stuckt", broker.address, specs, poll_workers=2, stuck_after=1.0)
        stopped: int | None = None
        client: Client | None = None
        try:
            info = loop.run_until_complete(asyncio.wait_for(impl.start(), 120))
            assert info["sessions"] == ["frozen", "lively"] and info["stuck"] == {}
            services = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path / "a") in " ".join(p.info["cmdline"] or [])
                        and "qcg._service" in " ".join(p.info["cmdline"] or [])]
            assert len(services) == 1, services
            stopped = services[0].pid
            os.kill(stopped, signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while "frozen" not in loop.run_until_complete(impl.ping())["stuck"]:
                assert time.monotonic() < deadline, "ping() never reported the frozen session as stuck"
                time.sleep(0.1)
            client = Client(broker.address)
            with client.expect("qcg/lively/state/quick state=complete", timeout=60):
                loop.run_until_complete(asyncio.wait_for(
                    impl.call("lively", "submit", [{"name": "quick", "exec": "/bin/true"}]), 60))
        finally:
            if client is not None:
                client.close()
            if stopped is not None:
                os.kill(stopped, signal.SIGCONT)
            try:
                loop.run_until_complete(asyncio.wait_for(impl.stop(), 120))
            finally:
                impl._pool.shutdown(wait=True)
                loop.close()


class TestBatchedRegistration:
    @pytest.mark.timeout(60)
    def test_open_sources_registers_many_in_one_round(self, broker_factory: Any) -> None:
        broker = broker_factory()
        pub = Publisher(broker.address)
        try:
            names = [(f"b{i}", "qcg") for i in range(300)]
            grants = pub.open_sources(names)
            assert set(grants) == {n for n, _ in names}
            assert all(epoch == 1 and seq == 1 for epoch, seq in grants.values())
            pub.publish(StateChanged(source="b7", backend="qcg", key="j", state=State.ACTIVE))
            pub.flush(10)
            pub.close_source("b7")
            again = pub.open_sources([("b7", "qcg")])
            assert again["b7"] == (2, 2), "a re-opened source gets a new epoch and continues the sequence"
            with pytest.raises(ValueError, match="without '/'"):
                pub.open_sources([("ok", "qcg"), ("bad/name", "qcg")])
        finally:
            pub.close()


class TestDeltaTicks:
    @pytest.mark.timeout(60)
    def test_ticks_carry_only_changed_sources_and_a_periodic_full_set(self, broker_factory: Any) -> None:
        """With 200 quiet sources and one busy one, most ticks name only the busy one; every
        ``FULL_TICK_EVERY``-th names all of them."""
        import zmq

        broker = broker_factory()
        pub = Publisher(broker.address)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        try:
            pub.open_sources([(f"q{i}", "qcg") for i in range(200)] + [("busy", "qcg")])
            sock.setsockopt(zmq.SUBSCRIBE, fr.TICK)
            from flowbus.bus._request import broker_info, same_host

            sock.connect(same_host(broker_info(ctx, broker.address, None, 5)["publish"], broker.address))
            seen: list[tuple[int, bool, int]] = []
            deadline = time.monotonic() + 30
            i = 0
            while len(seen) < FULL_TICK_EVERY + 5 and time.monotonic() < deadline:
                i += 1
                pub.publish(Heartbeat(source="busy", backend="qcg"))
                if sock.poll(50):
                    _topic, body = sock.recv_multipart()
                    _bid, marks, tick_no, full = fr.unpack(body)
                    seen.append((int(tick_no), bool(full), len(marks)))
            assert len(seen) >= FULL_TICK_EVERY + 5, f"only {len(seen)} ticks"
            deltas = [n for _no, full, n in seen[3:] if not full]  # the first ones carry the registrations
            fulls = [n for _no, full, n in seen if full]
            assert fulls and min(fulls) >= 201, f"a full tick names every source: {fulls}"
            assert deltas and max(deltas) <= 2, f"delta ticks should name the busy source only: {deltas}"
            numbers = [no for no, _f, _n in seen]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "tick numbers are consecutive"
        finally:
            sock.close(0)
            ctx.term()
            pub.close()

    @pytest.mark.timeout(60)
    def test_a_missed_tick_makes_the_subscriber_ask_for_all_marks(self, broker_factory: Any) -> None:
        """An event lost on the way whose tick was lost too: the next delta tick (which does not
        name that source) has a jump in its number, so the subscriber fetches every mark and
        replays the lost event."""
        broker = broker_factory()
        pub = Publisher(broker.address)
        sub = Subscriber(broker.address, "qcg/x/", start="live")
        try:
            pub.open_sources([("x", "qcg"), ("y", "qcg")])
            pub.publish(StateChanged(source="x", backend="qcg", key="a", state=State.ACTIVE))
            pub.flush(10)
            first = sub.recv(10)
            assert first is not None and first.seq == 1
            # lose event 2 on the way (not read live: forget it and everything after it)
            pub.publish(StateChanged(source="x", backend="qcg", key="a", state=State.COMPLETE))
            pub.flush(10)
            poll.until(lambda: sub._sock.poll(10) != 0, 10, "the live event", every=0.01)
            while sub._sock.poll(0):
                sub._sock.recv_multipart()  # dropped: event 2 and the ticks that named x
            assert sub.confirmed()["x"] == 1
            last = sub._tick_no or 0
            # a delta tick that skips a number and does not name x
            sub._handle(fr.TICK, fr.pack([sub.broker_id, {"y": ["qcg", 1, 0, 1]}, last + 5, False]))
            assert sub.statistics().get("ticks_missed") == 1
            ev = sub.recv(10)
            assert ev is not None and ev.seq == 2 and isinstance(ev, StateChanged) and ev.state == State.COMPLETE
        finally:
            sub.close()
            pub.close()
