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

from flowbus.actors import ACTOR_PREFIX, Supervisor, actor_pid, wait_started  # noqa: E402
from flowbus.bus import Client  # noqa: E402
from flowbus.schemas import (  # noqa: E402
    FlowbusConfig,
    Observed,
    QcgSessionConfig,
    RayConfig,
    StateChanged,
    UnknownSession,
)

from netcheck import off_loopback_listeners  # noqa: E402


def _config(tmp_path: Path, **qcg: Any) -> FlowbusConfig:
    return FlowbusConfig(ray=RayConfig(namespace="flowbus-test"),
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
    def test_actor_killed_ray_restarts_it_and_it_resyncs(self, system: Any) -> None:
        """SIGKILL of the actor: Ray restarts it, seq continues, the change missed meanwhile is
        published with observed=resync, and nothing is lost or duplicated in the stream."""
        client, actor, sup = system["client"], system["actor"], system["sup"]
        sub = client.subscribe("qcg/q1/", start="snapshot")
        ray.get(actor.call.remote("q1", "submit", [{"name": "slow", "exec": "/bin/sleep", "args": ["3"]}]), timeout=60)
        client.wait("qcg/q1/state/slow state=active", timeout=30)
        before = client.marks()["q1"]
        old_pid = actor_pid(actor)
        os.kill(old_pid, signal.SIGKILL)
        # the job finishes while nobody watches it (its manager survives the actor)
        info = wait_started(actor, timeout=120)
        assert info["pid"] != old_pid
        ev = client.wait("qcg/q1/state/slow state=complete", timeout=60)
        assert ev.observed in (Observed.RESYNC, Observed.POLL, Observed.PUSH)
        after = client.marks()["q1"]
        assert after[1] > before[1], "a restarted session must get a higher epoch"
        assert after[2] >= before[2] + 1, "seq continues across the restart"
        seqs: list[int] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            e = sub.recv(0.5)
            if e is None:
                if seqs and seqs[-1] >= after[2]:
                    break
                continue
            seqs.append(e.seq)
        live = [s for s in seqs if s > before[2] - 1]
        assert live == sorted(set(live)), "no duplicates, in order"
        sub.close()
        assert ray.get(sup.status.remote(), timeout=30)

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
