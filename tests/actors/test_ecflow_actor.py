"""An ecFlow session and a QCG session in one BackendActor, through Ray and the bus (real
loopback-only ecflow_server and QCG-PilotJob manager; everything is stopped at teardown)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from support import ecflow as _fx
from support.ecflow import EcfServer, write_suite

pytestmark = [pytest.mark.ray, pytest.mark.qcg]

ray = pytest.importorskip("ray")

from flowbus.actors import ACTOR_PREFIX, Supervisor
from flowbus.bus import Client
from flowbus.schemas import (
    BackendUnavailable,
    Connected,
    Disconnected,
    EcflowSessionConfig,
    FlowbusConfig,
    QcgSessionConfig,
    RayConfig,
    StateChanged,
)
from support.netcheck import off_loopback_listeners

ecf_server = _fx.ecf_server

SUITE = """\
family f
  task t1
  task t2
    trigger t1 == complete
endfamily
"""
SCRIPTS = {"f/t1": "true\n", "f/t2": "true\n"}


@pytest.fixture
def mixed(ray_local: str, broker_factory: Any, ecf_server: Callable[..., EcfServer], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Broker + Supervisor + one actor "shared" hosting an ecFlow session (e1) and a QCG session (q1)."""
    broker = broker_factory()
    server = ecf_server()
    cfg = FlowbusConfig(ray=RayConfig(namespace="flowbus-test"), sessions=[
        EcflowSessionConfig(name="e1", host="127.0.0.1", port=server.port, actor="shared"),
        QcgSessionConfig(name="q1", wd=str(tmp_path / "qcg"), actor="shared")])
    sup = Supervisor.remote(msgspec.json.encode(cfg), broker.address)
    client: Client | None = None
    try:
        placement = ray.get(sup.start.remote(), timeout=120)
        assert placement == {"e1": "shared", "q1": "shared"}
        client = Client(broker.address)
        yield {"server": server, "client": client, "actor": ray.get_actor(ACTOR_PREFIX + "shared")}
    finally:
        if client is not None:
            client.close()
        ray.get(sup.stop.remote(), timeout=90)
        ray.kill(sup)


class TestEcflowInActor:
    """An ecFlow session hosted next to a QCG session in one actor, observed through the bus."""

    @pytest.mark.timeout(240)
    def test_load_begin_wait_and_cross_backend_status(self, mixed: dict[str, Any]) -> None:
        """A suite loaded and begun through the actor completes on the bus, next to a QCG job in the same actor."""
        server, client, actor = mixed["server"], mixed["client"], mixed["actor"]
        assert off_loopback_listeners() == []
        text = write_suite(server, "s", SUITE, SCRIPTS)
        ray.get(actor.call.remote("e1", "load", text), timeout=60)
        ray.get(actor.call.remote("e1", "begin_suite", "s"), timeout=60)
        done = client.wait("ecflow/e1/state//s/f/t2 state=complete", timeout=60)
        assert isinstance(done, StateChanged) and done.native == "complete" and done.key == "/s/f/t2"
        assert client.wait("ecflow/e1/state//s/f/t1 state=complete", timeout=5).native == "complete"
        assert off_loopback_listeners() == []

        with client.expect("qcg/q1/state/job1 state=complete", timeout=60) as w:
            names = ray.get(actor.call.remote("q1", "submit", [{"name": "job1", "exec": "/bin/true"}]), timeout=60)
        assert names == ["job1"]
        assert isinstance(w.event, StateChanged) and w.event.native == "SUCCEED"

        latest: dict[tuple[str, str, str], StateChanged] = {
            (e.backend, e.source, e.key): e for e in client.status() if isinstance(e, StateChanged)}
        assert latest[("ecflow", "e1", "/s/f/t1")].native == "complete"
        assert latest[("ecflow", "e1", "/s/f/t2")].native == "complete"
        assert latest[("qcg", "q1", "job1")].native == "SUCCEED"
        assert ray.get(actor.call.remote("e1", "query", "state", "/s/f/t2"), timeout=30) == "complete"
        assert off_loopback_listeners() == []


class TestDeadServerAtStart:
    """One ecFlow server is down when the actor opens its sessions: only that session waits."""

    @pytest.mark.timeout(240)
    def test_dead_session_opens_disconnected_and_the_others_run(
            self, ray_local: str, broker_factory: Any, ecf_server: Callable[..., EcfServer], tmp_path: Path) -> None:
        """The Supervisor starts; e2 publishes Disconnected under its own name; e1 and q1 work; when
        e2's server comes up, e2 connects by itself."""
        broker = broker_factory()
        healthy = ecf_server()
        late = ecf_server(start=False)  # its port is chosen, nothing listens yet
        cfg = FlowbusConfig(ray=RayConfig(namespace="flowbus-test"), sessions=[
            EcflowSessionConfig(name="e1", host="127.0.0.1", port=healthy.port, actor="shared"),
            QcgSessionConfig(name="q1", wd=str(tmp_path / "qcg"), actor="shared"),
            EcflowSessionConfig(name="e2", host="127.0.0.1", port=late.port, actor="shared", timeout=0.5,
                                reconnect_backoff=0.2)])
        sup = Supervisor.remote(msgspec.json.encode(cfg), broker.address)
        client = Client(broker.address)
        try:
            with client.expect("ecflow/e2/session/", timeout=60) as down:
                placement = ray.get(sup.start.remote(), timeout=120)
            assert placement == {"e1": "shared", "q1": "shared", "e2": "shared"}
            assert isinstance(down.event, Disconnected) and down.event.will_retry, down.event
            assert down.event.source == "e2" and str(late.port) in down.event.reason, down.event
            actor = ray.get_actor(ACTOR_PREFIX + "shared")
            with pytest.raises(BackendUnavailable, match="session 'e2' is disconnected"):
                ray.get(actor.call.remote("e2", "ping"), timeout=30)
            with client.expect("qcg/q1/state/j state=complete", timeout=60):
                ray.get(actor.call.remote("q1", "submit", [{"name": "j", "exec": "/bin/true"}]), timeout=60)
            assert ray.get(actor.call.remote("e1", "suites"), timeout=30) == []
            with client.expect("ecflow/e2/session/ type=connected", timeout=60) as up:
                late.start()
            assert isinstance(up.event, Connected) and up.event.source == "e2"
            assert ray.get(actor.call.remote("e2", "suites"), timeout=30) == []
        finally:
            client.close()
            ray.get(sup.stop.remote(), timeout=90)
            ray.kill(sup)
