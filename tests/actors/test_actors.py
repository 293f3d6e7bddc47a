"""BackendActor and Supervisor on a real (loopback-only) Ray with a real QCG-PilotJob manager."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.qcg]

ray = pytest.importorskip("ray")

from flowbus.actors import ACTOR_PREFIX, Supervisor, actor_pid, wait_started
from flowbus.bus import Client
from flowbus.schemas import (
    FlowbusConfig,
    Observed,
    QcgSessionConfig,
    RayConfig,
    StateChanged,
    UnknownSession,
)
from support.netcheck import off_loopback_listeners


def _config(tmp_path: Path, **qcg: Any) -> FlowbusConfig:
    return FlowbusConfig(ray=RayConfig(namespace="flowbus-test", poll_workers=5),
                         sessions=[QcgSessionConfig(name="q1", wd=str(tmp_path / "qcg"), **qcg)])


@pytest.fixture
def system(ray_local: str, broker_factory: Any, tmp_path: Path) -> Any:
    """Broker + Supervisor + one BackendActor hosting one local QCG session."""
    import msgspec

    broker = broker_factory()
    sup = Supervisor.remote(msgspec.json.encode(_config(tmp_path)), broker.address)
    placement = ray.get(sup.start.remote(), timeout=120)
    client = Client(broker.address)
    actor = ray.get_actor(ACTOR_PREFIX + placement["q1"])
    yield {"broker": broker, "sup": sup, "client": client, "actor": actor}
    client.close()
    ray.get(sup.stop.remote(), timeout=90)
    ray.kill(sup)


def _qcg_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "qcg" in cmd.lower() and p.pid != os.getpid():
            out.append(p)
    return out


class TestBackendActor:
    @pytest.mark.timeout(180)
    def test_submit_and_wait_through_the_actor(self, system: Any) -> None:
        """Jobs submitted through the actor reach complete on the bus; waits see them."""
        client, actor = system["client"], system["actor"]
        assert ray.get(actor.ping.remote(), timeout=30)["scheduler"]["workers"] == 5  # ray.poll-workers reached it
        with client.expect("qcg/q1/state/chain-b state=complete", timeout=60) as w:
            names = ray.get(actor.call.remote("q1", "submit", [
                {"name": "chain-a", "exec": "/bin/true"},
                {"name": "chain-b", "exec": "/bin/true", "after": ["chain-a"]},
            ]), timeout=60)
        assert names == ["chain-a", "chain-b"]
        assert isinstance(w.event, StateChanged) and w.event.native == "SUCCEED"
        assert client.wait("qcg/q1/state/chain-a state=complete", timeout=5).key == "chain-a"

    @pytest.mark.timeout(60)
    def test_unknown_session_is_a_clear_error(self, system: Any) -> None:
        """A call naming a session the actor does not host raises UnknownSession."""
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(system["actor"].call.remote("nope", "list"), timeout=30)
        assert isinstance(info.value.cause, UnknownSession)

    @pytest.mark.timeout(60)
    def test_everything_listens_on_loopback_only(self, system: Any) -> None:
        """Ray, the broker, the actor and the QCG manager it started listen on 127.0.0.1 only."""
        assert off_loopback_listeners() == []

    @pytest.mark.timeout(240)
    def test_actor_killed_ray_restarts_it_and_it_resyncs(self, system: Any, tmp_path: Path) -> None:
        """SIGKILL of the actor: Ray restarts it, the epoch grows, seq continues, the change that
        happened while it was dead is published with observed=resync, and the stream has no gap
        and no duplicate."""
        client, actor = system["client"], system["actor"]
        flag = tmp_path / "release"
        sub = client.subscribe("qcg/q1/")
        ray.get(actor.call.remote("q1", "submit", [
            {"name": "gated", "script": f"while [ ! -e {flag} ]; do sleep 0.05; done"}]), timeout=60)
        client.wait("qcg/q1/state/gated state=active", timeout=60)
        before = client.marks()["q1"]
        old_pid = actor_pid(actor)
        os.kill(old_pid, signal.SIGKILL)
        flag.touch()  # the job ends while no session watches it (its manager outlives the actor)
        info = wait_started(actor, timeout=120)
        assert info["pid"] != old_pid
        ev = client.wait("qcg/q1/state/gated state=complete", timeout=60)
        assert ev.observed is Observed.RESYNC, ev
        assert ev.incarnation > before[1]
        after = client.marks()["q1"]
        assert after[1] > before[1], "a restarted session gets a higher epoch"
        assert ev.seq > before[2], "seq continues across the restart"
        seqs: list[int] = []
        while not seqs or seqs[-1] < ev.seq:
            e = sub.recv(10)
            assert e is not None, f"stream stalled after {seqs}"
            seqs.append(e.seq)
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"gap or duplicate in {seqs}"
        sub.close()

    @pytest.mark.timeout(180)
    def test_stop_leaves_no_qcg_processes(self, ray_local: str, broker_factory: Any, tmp_path: Path) -> None:
        """Stopping the supervisor ends the sessions and every QCG process they started."""
        import msgspec

        broker = broker_factory()
        before = {p.pid for p in _qcg_processes()}
        sup = Supervisor.remote(msgspec.json.encode(_config(tmp_path)), broker.address)
        placement = ray.get(sup.start.remote(), timeout=120)
        actor = ray.get_actor(ACTOR_PREFIX + placement["q1"])
        ray.get(actor.call.remote("q1", "submit", [{"name": "long", "exec": "/bin/sleep", "args": ["60"]}]), timeout=60)
        Client(broker.address).wait("qcg/q1/state/long state=active", timeout=30)
        ray.get(sup.stop.remote(), timeout=90)
        ray.kill(sup)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = [p for p in _qcg_processes() if p.pid not in before and p.is_running()]
            sleepers = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[:2] == ["/bin/sleep", "60"]]
            if not left and not sleepers:
                break
            time.sleep(0.2)
        assert not left and not sleepers, f"left behind: {left} {sleepers}"

    @pytest.mark.timeout(240)
    def test_a_hung_backend_does_not_stall_the_other_sessions(self, ray_local: str, broker_factory: Any,
                                                             tmp_path: Path) -> None:
        """Two sessions in one actor: while one manager is frozen (SIGSTOP), the other session's
        commands and events go on without waiting for it."""
        import msgspec

        broker = broker_factory()
        cfg = FlowbusConfig(ray=RayConfig(namespace="flowbus-test"), sessions=[
            # no liveness probe: its verdict would end the frozen session's hung call within 1.6 s
            QcgSessionConfig(name="frozen", wd=str(tmp_path / "a"), actor="shared", recovery="none", request_timeout=5.0,
                             liveness_interval=0),
            QcgSessionConfig(name="lively", wd=str(tmp_path / "b"), actor="shared")])
        sup = Supervisor.remote(msgspec.json.encode(cfg), broker.address)
        stopped: int | None = None
        try:
            placement = ray.get(sup.start.remote(), timeout=120)
            assert placement == {"frozen": "shared", "lively": "shared"}
            actor = ray.get_actor(ACTOR_PREFIX + "shared")
            client = Client(broker.address)
            services = [p for p in _qcg_processes() if str(tmp_path / "a") in " ".join(p.cmdline())
                        and "qcg._service" in " ".join(p.cmdline())]
            assert len(services) == 1, services
            stopped = services[0].pid
            os.kill(stopped, signal.SIGSTOP)
            hung = actor.call.remote("frozen", "list")  # blocks in the frozen session for its timeout
            t0 = time.monotonic()
            with client.expect("qcg/lively/state/quick state=complete", timeout=30):
                ray.get(actor.call.remote("lively", "submit", [{"name": "quick", "exec": "/bin/true"}]), timeout=30)
            assert time.monotonic() - t0 < 4.0, "the lively session waited for the frozen one"
            with pytest.raises(ray.exceptions.RayTaskError):
                ray.get(hung, timeout=60)
            client.close()
        finally:
            if stopped is not None:
                os.kill(stopped, signal.SIGCONT)
            ray.get(sup.stop.remote(), timeout=90)
            ray.kill(sup)

