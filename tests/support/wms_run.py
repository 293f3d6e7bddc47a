"""A started WmsSession with a poll thread, as a BackendActor hosts it, and the ``wms`` fixture
that makes them and checks at teardown that no thread or child process is left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from flowbus.schemas import StateChanged, WmsSessionConfig
from flowbus.services.wms import WmsSession
from flowbus.services.wms._parsl import PARSL_LOCK
from support.recorder import Recorder


class Running:
    """A started session with a poll thread, like a BackendActor hosts it."""

    def __init__(self, session: WmsSession, rec: Recorder) -> None:
        self.session, self.rec = session, rec
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"test-poll-{session.name}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.session.poll())

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        result = self.session.call(op, *args, **kwargs)
        msgspec.msgpack.encode(result)  # every result must cross Ray and the CLI as msgpack
        return result

    def halt(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def final(self, key: str, after: int = 0, timeout: float = 60.0) -> StateChanged:
        """The first final StateChanged of ``key`` at or after event index ``after``."""
        return self.rec.wait_for(lambda ev: next((e for e in ev[after:] if isinstance(e, StateChanged)
                                                  and e.key == key and e.state.final), None),
                                 timeout, f"a final state of {key}")

    def natives(self, key: str, after: int = 0) -> list[str]:
        return [e.native for e in self.rec.events[after:] if isinstance(e, StateChanged) and e.key == key]


@pytest.fixture
def wms(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start WmsSessions (stopped at teardown); afterwards no thread or child process may remain."""
    threads_before = set(threading.enumerate())
    # processes already running (a session-wide Ray from other test files) are not ours
    kids_before = {p.pid for p in psutil.Process().children(recursive=True)}
    made: list[Running] = []

    def make(name: str = "w1", known: dict[str, Any] | None = None, **cfg: Any) -> Running:
        cfg.setdefault("submit_dir", str(tmp_path / "submit" / name))
        session = WmsSession(WmsSessionConfig(name=name, **cfg))
        rec = Recorder()
        session.start(rec, known or {})
        run = Running(session, rec)
        run.thread.start()
        made.append(run)
        return run

    yield make
    for run in made:
        run.halt()
        run.session.stop()
    deadline = time.monotonic() + 10
    left: list[threading.Thread] = []
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if not left:
            break
        time.sleep(0.05)  # threads of the stopped sessions ending; nothing to arm on
    assert not left, f"threads left behind: {left}"
    _, alive = psutil.wait_procs([p for p in psutil.Process().children(recursive=True) if p.pid not in kids_before],
                                 timeout=10)
    kids = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not kids, f"processes left behind: {kids}"
    assert not PARSL_LOCK.locked()


__all__ = ["Running", "wms"]
