"""A QCG session driven for tests: the `qcg` fixture (a session on a manager of its own, closed
at teardown), `Running`, and the waits and process checks the QCG tests share."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from flowbus.schemas import (
    BackendUnavailable,
    Disconnected,
    Event,
    QcgSessionConfig,
    State,
    StateChanged,
)
from flowbus.services.qcg import QcgSession
from flowbus.services.qcg._service import launch
from support.recorder import Recorder, show  # shared with the other adapters' tests

# -- helpers ----------------------------------------------------------------------------------------


def first(cls: type[Any]) -> Callable[[list[Event]], Any]:
    return lambda evs: next((e for e in evs if isinstance(e, cls)), None)


def reached(key: str, state: State) -> Callable[[list[Event]], StateChanged | None]:
    return lambda evs: next((e for e in evs if isinstance(e, StateChanged) and e.key == key and e.state is state), None)


def pid_gone(pid: int) -> bool:
    """Gone or a zombie (the container's PID 1 may never reap reparented orphans)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):  # bounded polling of a process that is not ours to wait on
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def job_pids(service_pid: int, name: str) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(service_pid).children(recursive=True) if p.name() == name]
    except psutil.NoSuchProcess:
        return []


def assert_opened_down(run: Running, why: str) -> None:
    """start() returned with the session down: one Disconnected (will retry) naming ``why``, and
    a call refused naming the session."""
    assert run.session.phase == "down"
    assert [type(e) for e in run.rec.events] == [Disconnected], [show(e) for e in run.rec.events]
    down = run.rec.of(Disconnected)[0]
    assert down.will_retry and why in down.reason, down
    with pytest.raises(BackendUnavailable, match=f"list: session '{run.session.name}' is disconnected"):
        run.call("list")


#: the defaults a user gets (the liveness tests run with these, not the fixture's faster ones)
DEFAULTS = QcgSessionConfig(name="defaults")


@contextlib.contextmanager
def foreign_manager(wd: Path) -> Iterator[tuple[int, str]]:
    """A QCG manager no session owns (as a user would start it): ``(pid, address)``. At exit it
    is SIGCONTinued (a test may have stopped it) and SIGKILLed with its jobs, and reaped."""
    wd.mkdir(parents=True, exist_ok=True)
    proc, address = launch(["--log", "warning", "--wd", str(wd), "--nodes", "n1:2"], wd / "service.log", cwd=wd)
    try:
        yield proc.pid, address
    finally:
        kids = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        for pid in [proc.pid, *(k.pid for k in kids)]:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        proc.wait(10)
        psutil.wait_procs(kids, timeout=5)


@dataclass
class Running:
    session: QcgSession
    rec: Recorder
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        return self.session.call(operation, *args, **kwargs)

    def start_polling(self) -> None:
        self.thread = threading.Thread(target=self.poll_forever, name=f"poll-{self.session.name}", daemon=True)
        self.thread.start()

    def poll_forever(self) -> None:
        delay = 0.0
        while not self.stop.wait(delay):
            try:
                delay = self.session.poll()
            except BaseException as exc:  # noqa: BLE001 - surfaced at teardown
                self.errors.append(exc)
                delay = 0.2


@pytest.fixture(name="qcg")
def qcg_fixture(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Factory: a started QcgSession with a recorder and a poll thread; stopped at teardown,
    which then proves that no child process of ours was left behind."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    handlers = list(logging.getLogger("qcg.pilotjob.api").handlers)
    made: list[Running] = []

    def make(known: dict[str, Event] | None = None, start: bool = True, previous_address: str | None = None,
             poll: bool = True, **overrides: Any) -> Running:
        cfg = {"name": f"q{len(made)}", "wd": str(tmp_path / f"wd{len(made)}"), "nodes": "n1:2",
               "reconcile_interval": 0.5, "request_timeout": 1.0, "recovery_backoff": 0.1, **overrides}
        run = Running(QcgSession(QcgSessionConfig(**cfg)), Recorder())
        made.append(run)
        if start:
            run.session.start(run.rec, known or {}, previous_address=previous_address)
        if poll:
            run.start_polling()
        return run

    yield make
    failures: list[BaseException] = []
    for run in made:
        run.stop.set()
        if run.thread is not None:
            run.thread.join(5)
        try:
            run.session.stop()
        except Exception as exc:  # noqa: BLE001 - stop the others anyway, then fail
            failures.append(exc)
        finally:
            run.session.kill()
    deadline = time.monotonic() + 10
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(left, timeout=max(0.0, deadline - time.monotonic()))
    assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"
    assert not failures, f"stop() raised: {failures!r}"
    for run in made:
        assert not run.errors, f"poll() raised: {run.errors!r}"
    assert logging.getLogger("qcg.pilotjob.api").handlers == handlers, "QCG client log handlers leaked"

