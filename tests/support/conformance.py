"""The five backends behind one small interface, for the conformance suite (tests/services/test_conformance.py).

Each class starts, kills and restarts a real backend (ecflow_server, a QCG-PilotJob manager, a
soma-workflow light-mode engine, a ctrl_bps Parsl run, a guiServer emulator process), builds the
session config for it, and reads the backend's own view (:meth:`Backend.truth`) with the
backend's own means, never through the session under test. Work started by :meth:`make_work`
waits for ``<tmp>/gate``; :meth:`Backend.close` opens the gate and ends every process the
harness started.

:class:`Host` drives a session as a BackendActor does: ``start(emit, known={})``, then ``poll()``
from one thread, sleeping what it returns; ``pause()`` returns once no poll is under way.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import psutil
import pytest

from flowbus.demo import free_port
from flowbus.schemas import (
    BackendError,
    EcflowSessionConfig,
    Event,
    GuiserverSessionConfig,
    QcgSessionConfig,
    SessionConfig,
    SomaSessionConfig,
    StateChanged,
    WmsSessionConfig,
)
from flowbus.services import BackendSession
from support import poll
from support.recorder import Recorder

T = TypeVar("T")
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def live_descendants(pid: int) -> set[int]:
    """Live (non-zombie) descendants of ``pid``."""
    out: set[int] = set()
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return out
    for p in kids:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
    return out


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process we started and every descendant of it (a machine crash, as the jobs see it)."""
    kids = []
    with contextlib.suppress(psutil.Error):
        kids = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.kill()
    proc.wait(10)
    psutil.wait_procs(kids, timeout=5)


def gate_loop(gate: Path) -> str:
    return f"while [ ! -e {gate} ]; do sleep 0.1; done"


class Host:
    """A session with a recorder and a poll thread (pause/resume for changes made meanwhile)."""

    def __init__(self, session: BackendSession, rec: Recorder) -> None:
        self.session, self.rec = session, rec
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()  # held by the poll thread from the gate check to the end of a poll
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.session.start(self.rec, {})

    def start_polling(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"conformance-poll-{self.session.name}",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            with self._lock:
                if not self._gate.is_set():
                    delay = 0.05
                    continue
                try:
                    delay = self.session.poll()
                except BaseException as exc:  # noqa: BLE001 - poll() may raise only BackendError: surfaced at teardown
                    self.errors.append(exc)
                    delay = 0.2

    def pause(self) -> None:
        """No poll runs from now until :meth:`resume` (the one under way is finished first)."""
        self._gate.clear()
        with self._lock:
            pass

    def resume(self) -> None:
        self._gate.set()

    def stop_polling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the poll thread did not end"

    def close(self) -> None:
        """Stop polling, ``stop()`` and ``kill()`` the session (idempotent)."""
        self.stop_polling()
        try:
            self.session.stop()
        except BackendError as exc:
            self.errors.append(exc)
        finally:
            self.session.kill()


class Backend:
    """One backend as the conformance suite sees it (subclasses fill in the hooks)."""

    backend: ClassVar[str]
    #: seconds from the backend's death to the session's ``Disconnected``
    bound_s: ClassVar[float] = 2.0
    #: an operation every session of this backend knows
    known_op: ClassVar[str]
    #: a call that succeeds whenever the session is connected
    health: ClassVar[Call]
    #: calls with the wrong arity or argument types to real operations
    bad_args: ClassVar[tuple[Call, ...]]
    #: calls that would detach or end the session's connection
    breaking: ClassVar[tuple[Call, ...]] = ()
    #: values of :meth:`truth` that mean "still running"
    running: ClassVar[frozenset[str]]
    #: why a test cannot run for this backend ("" when it can)
    kill_skip: ClassVar[str] = ""
    unreachable_skip: ClassVar[str] = ""
    breaking_skip: ClassVar[str] = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.gate = tmp / "gate"

    # -- the backend ---------------------------------------------------------------------------------

    def start_backend(self) -> None:
        """Make the backend reachable (before this, a session cannot connect)."""

    def kill_backend(self, session: BackendSession) -> None:
        raise NotImplementedError

    def restart_backend(self) -> None:
        """Bring the killed backend back (where the session does that itself: nothing)."""

    def owned_pids(self) -> set[int]:
        """Processes the harness started (their descendants are theirs, not the session's)."""
        return set()

    def close(self) -> list[str]:
        """Open the gate and end everything the harness started; what was still alive after that."""
        self.gate.touch()
        return []

    # -- sessions ------------------------------------------------------------------------------------

    def config(self, name: str) -> SessionConfig:
        raise NotImplementedError

    def own_config(self, name: str) -> SessionConfig:
        """A session that starts its own backend processes where the backend allows it (test 9)."""
        return self.config(name)

    def make_work(self, session: BackendSession) -> str:
        """Start a resource that runs until the gate opens; return its key once it runs."""
        raise NotImplementedError

    def change_while_down(self) -> str | None:
        """Change the restarted backend behind the session's back; the key changed, or None."""
        return None

    # -- views ---------------------------------------------------------------------------------------

    def truth(self) -> dict[str, str]:
        """``{key: state}`` as the backend itself says (its own client or store)."""
        raise NotImplementedError

    def published(self, events: list[Event]) -> dict[str, str]:
        """The last state the session published per key, in :meth:`truth`'s vocabulary (keys the
        session reported gone are dropped)."""
        out: dict[str, str] = {}
        for e in events:
            if isinstance(e, StateChanged):
                out[e.key] = e.native
        return {k: v for k, v in out.items() if v}


# -- ecFlow -------------------------------------------------------------------------------------------


class Ecflow(Backend):
    """A real ecflow_server (tests/ecflow_fixtures.EcfServer) on a loopback port."""

    backend = "ecflow"
    bound_s = 1.0
    known_op = "ping"
    health = ("ping", (), {})
    bad_args = (("suspend", (), {}), ("suspend", (42,), {}), ("begin_suite", ("a", "b", "c"), {}))
    breaking = tuple(("client", (method, *args), {}) for method, *args in (
        ("set_user_name", "x"), ("set_host_port", "127.0.0.1", "1"), ("reset",), ("enable_ssl",),
        ("disable_ssl",), ("set_connection_attempts", 5), ("set_retry_connection_period", 5)))
    running = frozenset({"active"})

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        from support import ecflow as fx  # skips the test when python3-ecflow is missing

        if fx.SERVER_BIN is None:
            pytest.skip("ecflow: ecflow_server is not installed (bash scripts/dev.sh setup)")
        self.fx = fx
        self.server = fx.EcfServer(tmp / "ecf", fx._shim(tmp))

    def start_backend(self) -> None:
        self.server.start()

    def kill_backend(self, session: BackendSession) -> None:
        self.server.kill9()

    def restart_backend(self) -> None:
        self.server.start()

    def owned_pids(self) -> set[int]:
        proc = self.server.proc
        return {proc.pid} if proc is not None and proc.poll() is None else set()

    def close(self) -> list[str]:
        super().close()
        return list(self.server.stop())

    def config(self, name: str) -> SessionConfig:
        return EcflowSessionConfig(name=name, host="127.0.0.1", port=self.server.port, poll_interval=0.05,
                                   timeout=0.5, reconnect_backoff=0.05)

    def make_work(self, session: BackendSession) -> str:
        session.call("load", self.fx.write_suite(self.server, "work", "task t\n", {"t": gate_loop(self.gate) + "\n"}))
        session.call("begin_suite", "work")
        poll.until(lambda: self.truth().get("/work/t") in self.running, 30, "ecflow: /work/t active")
        return "/work/t"

    def change_while_down(self) -> str | None:
        path = self.tmp / "away.def"
        path.write_text(self.fx.write_suite(self.server, "away", "task a\n  defstatus complete\n", {}))
        self.server.client().load(str(path))
        return "/away/a"

    def truth(self) -> dict[str, str]:
        return dict(self.fx.server_states(self.server))

    def published(self, events: list[Event]) -> dict[str, str]:
        return {k: v for k, v in super().published(events).items() if k != "/"}  # "/" is the server itself


# -- QCG-PilotJob -------------------------------------------------------------------------------------

#: a QCG-PilotJob manager bound to 127.0.0.1 (QCG binds '*' unless told otherwise, and has no option for it)
_QCG_MANAGER = """\
import sys
from qcg.pilotjob.config import Config
Config.ZMQ_IP_ADDRESS.value["default"] = "127.0.0.1"
from qcg.pilotjob.service import QCGPMService
QCGPMService(sys.argv[1:]).start()
"""


class Qcg(Backend):
    """A QCG-PilotJob manager process the harness owns, on fixed ports (restartable in place);
    sessions connect to it. :meth:`own_config` is a session that starts its own manager."""

    backend = "qcg"
    bound_s = 3.0  # a connect-mode session learns of a death from a request timing out
    known_op = "list"
    health = ("list", (), {})
    bad_args = (("status", (), {}), ("status", (42,), {}), ("submit", ({"name": "x", "exec": "/bin/true"},), {}))
    breaking = ()
    breaking_skip = ("qcg: the harness's sessions connect to a manager, and finish() there is the documented "
                     "way to end it (the session ends with Disconnected(finished)); on a session's own manager "
                     "it is refused (test_qcg_session.py::TestErrors)")
    running = frozenset({"EXECUTING"})

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.port, self.pub_port = free_port(), free_port()
        self.wd = tmp / "qcg-manager"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _request(self, request: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        sock = self.ctx.socket(self.zmq.REQ)
        sock.setsockopt(self.zmq.LINGER, 0)
        try:
            sock.connect(self.address)
            sock.send_json(request)
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError(f"QCG manager {self.address}: no reply to {request['request']} in {timeout} s")
            reply: dict[str, Any] = sock.recv_json()  # type: ignore[assignment]  # QCG replies with a JSON object
        finally:
            sock.close()
        if reply.get("code", 0) != 0:
            raise RuntimeError(f"QCG manager refused {request['request']}: {reply}")
        return reply

    def start_backend(self) -> None:
        self.wd.mkdir(parents=True, exist_ok=True)
        args = ["--net", "--net-port", str(self.port), "--net-pub-port", str(self.pub_port), "--wd", str(self.wd),
                "--nodes", "n1:2", "--log", "warning"]
        with open(self.wd / "manager.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", _QCG_MANAGER, *args], cwd=self.wd, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)

        def answers() -> bool:
            assert proc.poll() is None, f"QCG manager exited ({proc.returncode}): see {self.wd / 'manager.log'}"
            try:
                self._request({"request": "listJobs"}, 0.5)
            except TimeoutError:
                return False
            return True

        poll.until(answers, 60, f"the QCG manager on {self.address}")

    def kill_backend(self, session: BackendSession) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_tree(proc)

    def restart_backend(self) -> None:
        self.start_backend()

    def owned_pids(self) -> set[int]:
        return {p.pid for p in self.procs if p.poll() is None}

    def close(self) -> list[str]:
        super().close()
        self.kill_backend(None)  # type: ignore[arg-type]  # no session is needed to kill it
        self.ctx.term()
        return []

    def config(self, name: str) -> SessionConfig:
        return QcgSessionConfig(name=name, mode="connect", address=self.address, wd=str(self.tmp / f"wd-{name}"),
                                request_timeout=1.0, reconcile_interval=0.5, recovery="restart",
                                recovery_attempts=1000, recovery_backoff=0.1)

    def own_config(self, name: str) -> SessionConfig:
        return QcgSessionConfig(name=name, mode="local", wd=str(self.tmp / f"own-{name}"), nodes="n1:2",
                                request_timeout=1.0, reconcile_interval=0.5, recovery_backoff=0.1)

    def _job(self, name: str) -> dict[str, Any]:
        return {"name": name, "exec": "/bin/sh", "args": ["-c", gate_loop(self.gate)]}

    def make_work(self, session: BackendSession) -> str:
        session.call("submit", [self._job("work")])
        poll.until(lambda: session.call("status", "work")["jobs"]["work"]["data"]["status"] in self.running, 30,
                   "qcg: job 'work' executing")
        return "work"

    def change_while_down(self) -> str | None:
        from qcg.pilotjob.api.job import Jobs

        self._request({"request": "submit", "jobs": Jobs().add(**self._job("away")).ordered_jobs()})
        return "away"

    def truth(self) -> dict[str, str]:
        jobs = self._request({"request": "listJobs"})["data"]["jobs"]
        return {str(name): str(data["status"]) for name, data in jobs.items()}

    def published(self, events: list[Event]) -> dict[str, str]:
        # LOST: the session's word for a job the manager does not know (gone with a dead manager)
        return {k: v for k, v in super().published(events).items() if v != "LOST"}


# -- soma-workflow ------------------------------------------------------------------------------------


class Soma(Backend):
    """soma-workflow in light mode: the engine runs in the session's process, on a directory
    that cannot be created until :meth:`start_backend` (a file stands in its way)."""

    backend = "soma"
    bound_s = 1.0
    known_op = "workflows"
    health = ("workflows", (), {})
    bad_args = (("workflow_status", (), {}), ("workflow_status", ("abc",), {}), ("submit_workflow", (42,), {}))
    #: the controller's own ways to end itself (soma's WorkflowController.stop_engine / disconnect)
    breaking = (("stop_engine", (), {}), ("disconnect", (), {}))
    running = frozenset({"running"})

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        pytest.importorskip("soma_workflow", reason="soma: soma-workflow is not installed")
        self.root = tmp / "soma-root"
        self.root.write_text("a file where the session's directory must go: the backend cannot start\n")
        self.directory = self.root / "soma"

    def start_backend(self) -> None:
        if self.root.is_file():
            self.root.unlink()

    def kill_backend(self, session: BackendSession) -> None:
        controller = getattr(session, "controller", None)
        assert controller is not None, "soma: the session holds no controller"
        controller._engine_proxy.engine_loop.stop_loop()  # the light-mode engine: the work stops being run

    def config(self, name: str) -> SessionConfig:
        return SomaSessionConfig(name=name, directory=str(self.directory), poll_interval=0.05, engine_refresh=0.05,
                                 recovery_backoff=0.05)

    def make_work(self, session: BackendSession) -> str:
        wf = session.call("submit_workflow", {"name": "work", "jobs": [
            {"name": "t", "command": ["sh", "-c", gate_loop(self.gate)]}]})
        key = f"{wf}/t"
        poll.until(lambda: self.truth().get(key) in self.running, 30, f"soma: job {key} running")
        return key

    def truth(self) -> dict[str, str]:
        """soma's own database (read-only): workflow and job statuses as the engine wrote them."""
        db = self.directory / "soma-workflow.db"
        if not db.exists():
            return {}
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            out = {str(wf): str(status) for wf, status in con.execute("SELECT id, status FROM workflows")}
            out.update({f"{wf}/{name}": str(status) for wf, name, status in
                        con.execute("SELECT workflow_id, name, status FROM jobs WHERE workflow_id IS NOT NULL")})
        finally:
            con.close()
        return out


# -- ctrl_bps with Parsl ------------------------------------------------------------------------------


class Wms(Backend):
    """lsst.ctrl.bps.parsl.ParslService on the socket-free LocalThreads site."""

    backend = "wms"
    known_op = "status"
    health = ("status", (), {})
    bad_args = (("status", ("a", "b"), {}),
                ("prepare", ({"name": "x", "jobs": [{"name": "a", "command": ["true"]}]}, "not-a-table"), {}))
    running = frozenset({"launched", "running", "running_ended"})
    kill_skip = ("wms: ParslService runs each workflow on threads of the session's own process (the LocalThreads "
                 "site): there is no WMS process to kill or restart, and ctrl_bps gives Parsl no liveness to lose")
    unreachable_skip = ("wms: start() imports and builds the ctrl_bps service in-process: there is no server that "
                        "could be unreachable")
    breaking_skip = ("wms: every operation goes through ctrl_bps' service API (prepare/submit/report/cancel/restart); "
                     "none reaches the session's own plumbing (each Parsl run loads and unloads its own DFK)")

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        pytest.importorskip("lsst.ctrl.bps.parsl", reason="wms: lsst-ctrl-bps-parsl is not installed")
        self.runs: list[Any] = []

    def close(self) -> list[str]:
        super().close()
        stuck = [run for run in self.runs if not run.join(30.0)]
        for run in stuck:
            run.cancel(timeout=5.0)
        return [f"Parsl run {run.wms_id} did not end" for run in stuck]

    def config(self, name: str) -> SessionConfig:
        return WmsSessionConfig(name=name, submit_dir=str(self.tmp / "submit" / name), poll_interval=0.05)

    def make_work(self, session: BackendSession) -> str:
        wid = session.call("submit_workflow", {"name": "work", "jobs": [
            {"name": "t", "command": ["sh", "-c", gate_loop(self.gate)]}]})["wms_id"]
        runs = getattr(session, "_runs", {})  # the run's Parsl futures are the backend's own view
        assert wid in runs, f"wms: the session keeps no Parsl run for {wid}"
        self.runs.append(runs[wid])
        key = f"{wid}/t"
        poll.until(lambda: self.truth().get(key) in self.running, 60, f"wms: job {key} running")
        return key

    def truth(self) -> dict[str, str]:
        """Parsl's own task status of every job future."""
        return {f"{run.wms_id}/{name}": str(job.future.task_status()) for run in self.runs
                for name, job in run.wf.jobs.items() if job.future is not None}


# -- DiFX guiServer -----------------------------------------------------------------------------------

#: the emulator as a process of its own, with job_1 a long-running job; its .difxlog is written
#: line by line (the real server writes it at job end), as ``truth()`` reads the running state there
_EMULATOR = """\
import sys, threading
from flowbus.services.guiserver_emulator import GuiserverEmulator
emu = GuiserverEmulator(sys.argv[2], port=int(sys.argv[1]), outcomes={"job_1": "slow"}, slow_ticks=100000,
                        step_delay=0.2, difxlog_live=True).start()
print("EMULATOR-READY", emu.port, flush=True)
threading.Event().wait()
"""

#: DifxStatusMessage states (the words of a .difxlog STATUS line) -> flowbus State values
_DIFX_STATES = {"Spawning": "active", "Starting": "active", "Running": "active", "Ending": "active",
                "Done": "complete", "MpiDone": "complete", "Aborting": "aborted", "Terminating": "cancelled",
                "Terminated": "cancelled", "Crashed": "aborted"}


class Guiserver(Backend):
    """The guiServer emulator as a process of its own (SIGKILLed and restarted on the same port
    and sandbox); ``/data/exp/job_1.input`` runs until the emulator dies."""

    backend = "guiserver"
    bound_s = 1.0
    known_op = "ls"
    health = ("ls", ("/data/exp",), {})
    bad_args = (("ls", (), {}), ("ls", (42,), {}), ("start_job", ("/data/exp/job_1.input", "USNO", False, False, 1, 2), {}))
    running = frozenset({"active"})
    breaking_skip = ("guiserver: call() reaches no connection-level packet (version handshake, setup path, channel "
                     "mode); relay/select change what is relayed and are re-applied after every reconnect")

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.port = free_port()
        self.sandbox = tmp / "gs-sandbox"
        (self.sandbox / "data" / "exp").mkdir(parents=True)
        (self.sandbox / "data" / "exp" / "job_1.input").write_text("# fake\n")
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_backend(self) -> None:
        log_path = self.tmp / f"emulator{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", _EMULATOR, str(self.port), str(self.sandbox)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)

        def ready() -> bool:
            assert proc.poll() is None, f"the emulator exited ({proc.returncode}): {log_path.read_text()[-2000:]}"
            return "EMULATOR-READY" in log_path.read_text()

        poll.until(ready, 30, f"the guiServer emulator on port {self.port}")

    def kill_backend(self, session: BackendSession) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_tree(proc)

    def restart_backend(self) -> None:
        self.start_backend()

    def owned_pids(self) -> set[int]:
        return {p.pid for p in self.procs if p.poll() is None}

    def close(self) -> list[str]:
        super().close()
        self.kill_backend(None)  # type: ignore[arg-type]  # no session is needed to kill it
        return []

    def config(self, name: str) -> SessionConfig:
        return GuiserverSessionConfig(name=name, host="127.0.0.1", port=self.port, allowed_dirs=["/data"],
                                      request_timeout=2.0, reconnect_backoff=0.05)

    def make_work(self, session: BackendSession) -> str:
        session.call("start_job", "/data/exp/job_1.input")
        poll.until(lambda: self.truth().get("job_1") in self.running, 30, "guiserver: job_1 running")
        return "job_1"

    def change_while_down(self) -> str | None:
        """job_1 ended while guiServer was down: its .difxlog says so (DiFX runs under mpirun, not
        under guiServer)."""
        log = self.sandbox / "data" / "exp" / "job_1.difxlog"
        with open(log, "a") as fh:
            fh.write(f"{time.ctime()}   0 mk5manager  STATUS Done  done\n")
        return "job_1"

    def truth(self) -> dict[str, str]:
        """The last STATUS line of every job's .difxlog in the emulator's sandbox."""
        out: dict[str, str] = {}
        for log in self.sandbox.rglob("*.difxlog"):
            status = [ln for ln in log.read_text().splitlines() if "  STATUS " in ln]
            if status:
                word = status[-1].split("  STATUS ", 1)[1].split()[0]
                out[log.stem] = _DIFX_STATES.get(word, "unknown")
        return out

    def published(self, events: list[Event]) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in events:
            if isinstance(e, StateChanged) and "input" in e.attrs:
                out[e.key] = e.state.value
        return out


class GuiserverReal(Guiserver):
    """A real guiServer built from DiFX's source (``FLOWBUS_GUISERVER_BIN``; skipped without it), run
    as ``tests/support/guiserver.py``'s ``real_server`` fixture runs it (stand-in DiFX tools, loopback
    only), on a port fixed here so that a session configured before the server starts finds it.
    ``job_1`` runs until the server dies. The server writes a job's ``.difxlog`` only when the job
    ends, so :meth:`truth` also counts a job as running while its stand-in ``mpifxcorr`` lives, and
    as ``unknown`` once its ``.difxlog`` exists with no STATUS line and nothing of it runs (after a
    crash: the job's processes die with the server's pipes, and the server's buffer is lost)."""

    def __init__(self, tmp: Path) -> None:
        from support.guiserver import REAL_BIN, RealServer

        if not REAL_BIN:
            pytest.skip("set FLOWBUS_GUISERVER_BIN to a guiServer built from DiFX's source to run the conformance "
                        "suite against a real guiServer (docs/backends/guiserver.md)")
        Backend.__init__(self, tmp)
        self.port = free_port()
        fixed = self.port

        class _Fixed(RealServer):
            def _launch(self) -> RealServer:
                self.port = fixed  # start() drew a free port; the session was configured with ours
                return super()._launch()

        self.srv = _Fixed(REAL_BIN, tmp / "real", outcomes={"job_1": "slow"})
        self.input = str(self.srv.data / "job_1.input")
        self.health = ("ls", (str(self.srv.data),), {})  # type: ignore[misc]  # the path is known only here
        self._started = False

    def start_backend(self) -> None:
        if self._started:
            self.srv.restart()
            return
        self.srv.start()
        self._started = True
        Path(self.input).write_text("# fake\n")

    def kill_backend(self, session: BackendSession) -> None:
        if self.srv.alive:
            self.srv.crash()

    def restart_backend(self) -> None:
        self.srv.restart()

    def owned_pids(self) -> set[int]:
        return {self.srv.proc.pid} if self.srv.proc is not None and self.srv.alive else set()

    def close(self) -> list[str]:
        Backend.close(self)
        self.srv.stop()
        return []

    def config(self, name: str) -> SessionConfig:
        return GuiserverSessionConfig(name=name, host="127.0.0.1", port=self.port, allowed_dirs=[str(self.srv.root)],
                                      request_timeout=2.0, reconnect_backoff=0.05)

    def make_work(self, session: BackendSession) -> str:
        session.call("start_job", self.input)
        poll.until(lambda: self.truth().get("job_1") in self.running, 30, "guiserver (real): job_1 running")
        return "job_1"

    def change_while_down(self) -> str | None:
        log = self.srv.data / "job_1.difxlog"
        with open(log, "a") as fh:
            fh.write(f"{time.ctime()}   0 mk5manager  STATUS Done  done\n")
        return "job_1"

    def _running_jobs(self) -> set[str]:
        names = set()
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info.get("cmdline") or []
            if "mpifxcorr" in cmd and cmd[-1].startswith(str(self.srv.data)):
                names.add(Path(cmd[-1]).stem)
        return names

    def truth(self) -> dict[str, str]:
        running = self._running_jobs()
        out: dict[str, str] = dict.fromkeys(running, "active")
        for log in self.srv.data.glob("*.difxlog"):
            status = [ln for ln in log.read_text().splitlines() if "  STATUS " in ln]
            if status:
                out[log.stem] = _DIFX_STATES.get(status[-1].split("  STATUS ", 1)[1].split()[0], "unknown")
            elif log.stem not in running:
                out[log.stem] = "unknown"
        return out


BACKENDS: dict[str, type[Backend]] = {cls.backend: cls for cls in (Ecflow, Qcg, Soma, Wms, Guiserver)}
BACKENDS["guiserver-real"] = GuiserverReal


def harness_for(backend: str, tmp: Path) -> Backend:
    os.makedirs(tmp, exist_ok=True)
    return BACKENDS[backend](tmp)


__all__ = ["BACKENDS", "Backend", "Host", "harness_for", "live_descendants"]
