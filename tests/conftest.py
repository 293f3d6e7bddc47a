"""Shared fixtures: a loopback-only Ray, a broker factory, and the guards every run keeps:
no listener of ours beyond loopback, and no process of ours left behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLOWBUS_STATE_DIR", tempfile.mkdtemp(prefix="flowbus-test-state-"))

import psutil  # noqa: E402
import pytest  # noqa: E402
import structlog  # noqa: E402

from flowbus.bus import BrokerProcess  # noqa: E402
from netcheck import off_loopback_listeners, process_name  # noqa: E402
from flowbus.schemas import BusConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[str]:
    """A private Ray on 127.0.0.1 for the whole run (started once: it costs ~4 s)."""
    from flowbus.actors import start_ray, stop_ray
    from flowbus.schemas import RayConfig

    address = start_ray(RayConfig(num_cpus=2, object_store_mb=80, namespace="flowbus-test"))
    bad = off_loopback_listeners()
    assert not bad, f"Ray is listening beyond loopback: {bad}"
    yield address
    stop_ray()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[object]:
    """Start real broker processes on random loopback ports; all are stopped at teardown."""
    made: list[BrokerProcess] = []

    def make(journal: bool = True, **bus: object) -> BrokerProcess:
        cfg = BusConfig(request_port=0, publish_port=0, ingest_port=0, heartbeat_interval=0.1, **bus)  # type: ignore[arg-type]
        n = len(made)
        bp = BrokerProcess(cfg, str(tmp_path / f"journal{n}") if journal else None, log_path=str(tmp_path / f"broker{n}.log"))
        bp.start()
        made.append(bp)
        return bp

    yield make
    for bp in made:
        bp.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process started by the tests is still alive (then end it, by PID)."""
    left = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if left:
        names = [f"{p.pid}: {process_name(p.pid)}" for p in left]
        print(f"\nLEAKED PROCESSES after the test run: {names}")
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        session.exitstatus = 1
