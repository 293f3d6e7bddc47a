"""The non-QCG loads of ``bench/soak.py``: an ecFlow suite cycling through a repeat, soma
workflows (light mode) and WMS/Parsl workflows, each through a real flowbus session (its own
poll thread, publishing to the soak's broker) with a short retention, so that forgetting happens
during the run.

* ecFlow: a real ``ecflow_server`` started here on 127.0.0.1 (the LD_PRELOAD loopback bind
  shim, ``bench/_scale_servers.py``), its own ECF_HOME, ``ECF_LOG=/dev/null``; one suite whose
  family has a ``repeat integer`` over ``tasks`` tasks running ``true`` (real jobs through
  ECF_JOB_CMD and ``ecflow_client``). Stopped by PID and process group in :meth:`Load.stop`.
* soma: a ``SomaSession`` in light mode (the engine runs in this process), ``forget-in-backend``
  on, workflows of two chained ``true`` jobs kept ``inflight`` at a time.
* WMS: a ``WmsSession`` with ParslService and the ``LocalThreads`` site, ``forget-in-backend``
  on by default (forgotten runs' submit directories removed), workflows of two chained ``true`` jobs (Parsl
  runs one workflow per process at a time).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import BenchError, log

Emit = Callable[[Any], None]


class Load:
    """A session polled by a thread of its own; a feeder thread keeps work in flight."""

    backend = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.session: Any = None
        self.finished = 0  # workflows (cycles for ecFlow) seen finished by the emitter
        self.submitted = 0
        self.forgotten = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._no_more = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- to override ---------------------------------------------------------------------------
    def _make(self, tmp: Path) -> Any:
        raise NotImplementedError

    def _counts(self, ev: Any) -> bool:
        """Whether ``ev`` is the end of one unit of work."""
        raise NotImplementedError

    def _feed(self) -> None:
        """Submit one unit of work (called while fewer than ``inflight`` are under way)."""

    inflight = 0

    def pids(self) -> dict[str, int]:
        return {}

    def progress(self) -> int:
        return self.finished

    # -- common --------------------------------------------------------------------------------
    def start(self, tmp: Path, publish: Emit) -> None:
        from flowbus.schemas import Forgotten

        self.session = self._make(tmp)

        def emit(ev: Any) -> None:
            if isinstance(ev, Forgotten):
                self.forgotten += 1
            elif self._counts(ev):
                self.finished += 1
            publish(ev)

        self.session.start(emit, {})
        self._spawn(self._poll, f"soak-poll-{self.name}")
        if self.inflight:
            self._spawn(self._feeder, f"soak-feed-{self.name}")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.session.poll()
            except Exception as exc:  # noqa: BLE001  (reported at the end of the run)
                self.errors.append(f"poll: {exc!r}")
                delay = 0.5
            self._stop.wait(min(delay, 0.2))

    def _feeder(self) -> None:
        while not self._stop.is_set():
            if self._no_more.is_set():
                return
            if self.submitted - self.finished < self.inflight:
                try:
                    self._feed()
                    self.submitted += 1
                except Exception as exc:  # noqa: BLE001  (reported at the end of the run)
                    self.errors.append(f"submit: {exc!r}")
                    self._stop.wait(1.0)
            else:
                self._stop.wait(0.05)

    def quiesce(self, timeout: float) -> None:
        """Submit no more, and wait up to ``timeout`` s for what is under way to finish (so that
        stopping the session does not cancel it)."""
        self._no_more.set()
        deadline = time.monotonic() + timeout
        while self.finished < self.submitted and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        if self.session is not None:
            self.session.stop()


class EcflowLoad(Load):
    backend = "ecflow"

    def __init__(self, name: str, tasks: int, retain_count: int) -> None:
        super().__init__(name)
        self.tasks, self.retain_count = tasks, retain_count
        self.server: Any = None

    def _make(self, tmp: Path) -> Any:
        import _scale_servers
        from flowbus.demo import HEAD_H, TAIL_H
        from flowbus.schemas import EcflowSessionConfig
        from flowbus.services.ecflow import EcflowSession

        client_bin = shutil.which("ecflow_client", path="/usr/bin:/usr/sbin:/bin")
        if client_bin is None:
            raise BenchError("ecflow_client is not installed (bash scripts/dev.sh setup)")
        root = tmp / "ecflow"
        root.mkdir()
        self.server = server = _scale_servers.Server(root, _scale_servers.shim(root))
        deadline = time.monotonic() + 30
        while not server.up():
            if time.monotonic() > deadline:
                raise BenchError(f"ecflow_server on {server.port} did not come up")
            time.sleep(0.02)
        home = server.home
        (home / "include").mkdir()
        (home / "include" / "head.h").write_text(HEAD_H.format(bindir=os.path.dirname(client_bin)))
        (home / "include" / "tail.h").write_text(TAIL_H)
        (home / "soak" / "f").mkdir(parents=True)
        for t in range(self.tasks):
            (home / "soak" / "f" / f"t{t}.ecf").write_text("%include <head.h>\ntrue\n%include <tail.h>\n")
        lines = ["suite soak", f"  edit ECF_HOME '{home}'", f"  edit ECF_INCLUDE '{home}/include'",
                 "  edit ECF_CLIENT_HOST '127.0.0.1'", "  edit ECF_TRIES '1'", "  family f",
                 "    repeat integer i 0 1000000000"]
        lines += [f"    task t{t}" for t in range(self.tasks)]
        lines += ["  endfamily", "endsuite"]
        server.load("\n".join(lines) + "\n")
        session = EcflowSession(EcflowSessionConfig(name=self.name, host="127.0.0.1", port=server.port,
                                                    retain_hours=0.0, retain_count=self.retain_count))
        return session

    def start(self, tmp: Path, publish: Emit) -> None:
        super().start(tmp, publish)
        _scale_servers_client(self.server.port).begin_suite("soak")

    def _counts(self, ev: Any) -> bool:
        return False  # cycles are read from the server's repeat (a poll may miss a brief complete)

    def progress(self) -> int:
        """Completed cycles: the family's repeat value on the server."""
        try:
            c = _scale_servers_client(self.server.port)
            c.sync_local()
            node = c.get_defs().find_abs_node("/soak/f")
            self.finished = int(node.get_repeat().value())
        except RuntimeError as exc:
            self.errors.append(f"repeat: {exc}")
        return self.finished

    def pids(self) -> dict[str, int]:
        return {"ecflow_server": self.server.proc.pid} if self.server is not None else {}

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.server is not None:
                self.server.stop()
                try:
                    self.server.proc.wait(10)
                except Exception:  # noqa: BLE001
                    self.server.proc.kill()
                    self.server.proc.wait(5)


def _scale_servers_client(port: int) -> Any:
    import _scale_servers

    return _scale_servers.quick_client(port)


_TWO_JOBS = [{"name": "a", "command": ["true"]}, {"name": "b", "command": ["true"], "after": ["a"]}]


class SomaLoad(Load):
    backend = "soma"

    def __init__(self, name: str, inflight: int, retain_count: int) -> None:
        super().__init__(name)
        self.inflight, self.retain_count = inflight, retain_count

    def _make(self, tmp: Path) -> Any:
        from flowbus.schemas import SomaSessionConfig
        from flowbus.services.soma import SomaSession

        return SomaSession(SomaSessionConfig(name=self.name, directory=str(tmp / "soma"), proc_nb=2,
                                             retain_hours=0.0, retain_count=self.retain_count,
                                             forget_in_backend=True))

    def _feed(self) -> None:
        self.session.call("submit_workflow", {"name": f"w{self.submitted}", "jobs": _TWO_JOBS})

    def _counts(self, ev: Any) -> bool:
        from flowbus.schemas import StateChanged

        return isinstance(ev, StateChanged) and ev.state.final and "/" not in ev.key and ev.key != ""


class WmsLoad(Load):
    backend = "wms"

    def __init__(self, name: str, inflight: int, retain_count: int) -> None:
        super().__init__(name)
        self.inflight, self.retain_count = inflight, retain_count

    def _make(self, tmp: Path) -> Any:
        from flowbus.schemas import WmsSessionConfig
        from flowbus.services.wms import WmsSession

        return WmsSession(WmsSessionConfig(name=self.name, submit_dir=str(tmp / "wms"), cores=2,
                                           retain_hours=0.0, retain_count=self.retain_count))

    def _feed(self) -> None:
        self.session.call("submit_workflow", {"name": f"w{self.submitted}", "jobs": _TWO_JOBS})

    def _counts(self, ev: Any) -> bool:
        from flowbus.schemas import StateChanged

        return isinstance(ev, StateChanged) and ev.state.final and ev.attrs.get("kind") == "workflow"


def start_all(loads: list[Load], tmp: Path, publish: Emit) -> None:
    for load in loads:
        t0 = time.monotonic()
        load.start(tmp, publish)
        log(f"{load.backend} session {load.name!r} up in {time.monotonic() - t0:.1f} s")
