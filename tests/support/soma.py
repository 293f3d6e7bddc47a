"""Fixtures for the soma-workflow session tests: a started SomaSession with a recorder and a
poll thread, stopped at teardown, with checks that no soma thread and no job process is left."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from flowbus.schemas import Event, SomaSessionConfig, StateChanged
from flowbus.services.soma import SomaSession
from support import poll
from support.recorder import Recorder

SOMA_THREAD_NAMES = ("poll_thread", "scheduler_loop")


def soma_threads() -> list[str]:
    """Names of live threads soma started (its scheduler threads and engine loops)."""
    return [f"{type(t).__name__}:{t.name}" for t in threading.enumerate()
            if t.name in SOMA_THREAD_NAMES or type(t).__name__ == "EngineLoopThread"]


def live_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


@dataclass
class Running:
    session: SomaSession
    rec: Recorder
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        return self.session.call(operation, *args, **kwargs)

    def start_polling(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=f"test-poll-{self.session.name}", daemon=True)
        self.thread.start()

    def stop_polling(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)
            assert not self.thread.is_alive(), "poll thread did not end"

    def _loop(self) -> None:
        delay = 0.0
        while not self.stop.wait(delay):
            try:
                delay = self.session.poll()
            except BaseException as exc:  # noqa: BLE001  (surfaced at teardown)
                self.errors.append(exc)
                delay = 0.2

    def final(self, key: str, timeout: float = 60.0) -> StateChanged:
        return self.rec.final(key, timeout)

    def state(self, key: str, pred: Callable[[StateChanged], bool], timeout: float = 60.0, what: str = "") -> StateChanged:
        """Wait for a StateChanged of ``key`` matching ``pred``."""
        return self.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, StateChanged) and e.key == key
                                                  and pred(e)), None), timeout, what or f"a state of {key}")


def latest(rec: Recorder) -> dict[str, StateChanged]:
    out: dict[str, StateChanged] = {}
    for e in rec.of(StateChanged):
        out[e.key] = e
    return out


@pytest.fixture
def soma_session(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Factory: a started SomaSession (light mode in tmp_path) with a recorder and a poll thread."""
    made: list[Running] = []
    before = live_children()
    stdout = sys.stdout

    def make(known: dict[str, Event] | None = None, start: bool = True, poll: bool = True,
             **overrides: Any) -> Running:
        cfg: dict[str, Any] = {"name": f"s{len(made)}", "directory": str(tmp_path / f"soma{len(made)}"),
                               "poll_interval": 0.05, "engine_refresh": 0.05, "recovery_backoff": 0.05, **overrides}
        run = Running(SomaSession(SomaSessionConfig(**cfg)), Recorder())
        made.append(run)
        if start:
            run.session.start(run.rec, known or {})
        if poll:
            run.start_polling()
        return run

    yield make
    for run in made:
        run.stop_polling()
        run.session.stop()
        run.session.kill()
    for run in made:
        assert not run.errors, f"poll() raised: {run.errors!r}"
    assert soma_threads() == [], f"soma threads left: {soma_threads()}"
    assert sys.stdout is stdout, "sys.stdout was left swapped"
    poll.until(lambda: not (live_children() - before), 10, f"job processes to end: {live_children() - before}")
