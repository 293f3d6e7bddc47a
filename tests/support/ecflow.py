"""Real ``ecflow_server`` processes for tests: loopback-only (LD_PRELOAD bind shim), a free port
in 1024-49151, their own ECF_HOME, real jobs through ECF_JOB_CMD; everything they start is
killed at teardown, and the teardown proves that no server or job process is left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

ecflow = pytest.importorskip("ecflow", reason="python3-ecflow is not installed (bash scripts/dev.sh setup)")

from flowbus.demo import HEAD_H, TAIL_H, free_port
from flowbus.schemas import EcflowSessionConfig, Event, State, StateChanged
from flowbus.services.ecflow import EcflowSession
from support.recorder import Recorder

SERVER_BIN = shutil.which("ecflow_server") or shutil.which("ecflow_server", path="/usr/sbin:/usr/bin")
CLIENT_BIN = shutil.which("ecflow_client") or "/usr/bin/ecflow_client"
REPO = Path(__file__).resolve().parents[2]


def _shim(tmp_root: Path) -> str:
    """The loopback bind shim dev.sh builds into the venv, or one built here from its source."""
    built = Path(sys.prefix) / "lib" / "libloopback_bind.so"
    if built.exists():
        return str(built)
    gcc = shutil.which("gcc")
    src = REPO / "scripts" / "loopback_bind.c"
    if gcc is None or not src.exists():
        pytest.skip("no loopback bind shim (bash scripts/dev.sh setup builds it); ecflow_server would bind 0.0.0.0")
    out = tmp_root / "libloopback_bind.so"
    if not out.exists():
        subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"], check=True)
    return str(out)


def quick_client(port: int) -> Any:
    client = ecflow.Client("127.0.0.1", str(port))
    client.set_connection_attempts(1)
    client.set_retry_connection_period(0)
    return client


class EcfServer:
    """One ecflow_server process (restartable on the same port and ECF_HOME)."""

    def __init__(self, home: Path, shim: str) -> None:
        self.home = home
        self.port = free_port()
        self.shim = shim
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgids: set[int] = set()
        (home / "include").mkdir(parents=True, exist_ok=True)
        (home / "include" / "head.h").write_text(HEAD_H.format(bindir=os.path.dirname(CLIENT_BIN)))
        (home / "include" / "tail.h").write_text(TAIL_H)

    @property
    def check_file(self) -> Path:
        return self.home / "ecf.check"

    def start(self, restart: bool = True) -> EcfServer:
        env = {"PATH": "/usr/sbin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.home),
               "ECF_HOME": str(self.home), "ECF_PORT": str(self.port), "LD_PRELOAD": self.shim,
               "ECF_LOG": str(self.home / "ecf.log"), "ECF_CHECK": str(self.check_file),
               "ECF_CHECKOLD": str(self.home / "ecf.check.b")}
        with open(self.home / "server.out", "ab") as out:
            self.proc = subprocess.Popen([str(SERVER_BIN), "--port", str(self.port)], cwd=self.home, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pgids.add(self.proc.pid)
        client = quick_client(self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except RuntimeError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ecflow_server did not come up: {(self.home / 'server.out').read_text()}") from exc
                time.sleep(0.01)
        bad = [addr for addr in self.listeners() if not addr.startswith("127.")]
        assert not bad, f"ecflow_server listens beyond loopback: {bad}"
        if restart:
            client.restart_server()
        return self

    def client(self) -> Any:
        return quick_client(self.port)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def listeners(self) -> list[str]:
        assert self.proc is not None
        return [f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(self.proc.pid).net_connections("inet")
                if c.status == psutil.CONN_LISTEN]

    def ours(self) -> list[psutil.Process]:
        """The server and every job process (its process group, or anything run from ECF_HOME)."""
        found = []
        home = str(self.home)
        for p in psutil.process_iter():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue  # dead already, waiting for whoever reaps it
                if os.getpgid(p.pid) in self.pgids or any(home in part for part in p.cmdline()):
                    found.append(p)
            except (psutil.Error, ProcessLookupError):
                continue
        return [p for p in found if p.pid != os.getpid()]

    def stop(self) -> list[str]:
        """Terminate the server, kill every job, and return what was still alive after that."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.client().terminate_server()
            except RuntimeError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + 10
        while True:  # a job shell may fork a child command while we kill: sweep until none is left
            procs = self.ours()
            if not procs or time.monotonic() > deadline:
                break
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=2)
        return [f"{p.pid}: {' '.join(p.cmdline())[:80]}" for p in self.ours()]


def write_suite(server: EcfServer, suite: str, defs_body: str, scripts: dict[str, str],
                tries: int = 1) -> str:
    """Write ``<ECF_HOME>/<suite>/<path>.ecf`` for each script (head/tail included) and return
    the definition text of the suite."""
    for rel, body in scripts.items():
        path = server.home / suite / f"{rel}.ecf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("%include <head.h>\n" + textwrap.dedent(body) + "%include <tail.h>\n")
    head = (f"suite {suite}\n  edit ECF_HOME '{server.home}'\n  edit ECF_INCLUDE '{server.home}/include'\n"
            f"  edit ECF_CLIENT_HOST '127.0.0.1'\n  edit ECF_TRIES '{tries}'\n"
            "  edit ECF_KILL_CMD 'pkill -15 -P %ECF_RID%; kill -15 %ECF_RID%'\n")
    return head + textwrap.indent(textwrap.dedent(defs_body), "  ") + "endsuite\n"


@pytest.fixture
def ecf_server(tmp_path: Path) -> Iterator[Callable[..., EcfServer]]:
    """Factory: started ecflow_server processes; all stopped at teardown with their jobs."""
    if SERVER_BIN is None:
        pytest.skip("ecflow_server is not installed (bash scripts/dev.sh setup)")
    shim = _shim(tmp_path)
    made: list[EcfServer] = []

    def make(start: bool = True, restart: bool = True) -> EcfServer:
        server = EcfServer(tmp_path / f"ecf{len(made)}", shim)
        made.append(server)
        if start:
            server.start(restart=restart)
        return server

    yield make
    left: list[str] = []
    for server in made:
        left += server.stop()
    assert not left, f"ecflow processes left behind: {left}"


# -- sessions ---------------------------------------------------------------------------------------


def reached(key: str, *states: State, try_no: int = 0) -> Callable[[list[Event]], StateChanged | None]:
    def check(events: list[Event]) -> StateChanged | None:
        for e in events:
            if isinstance(e, StateChanged) and e.key == key and e.state in states and (not try_no or e.try_no == try_no):
                return e
        return None
    return check


@dataclass
class Running:
    session: EcflowSession
    rec: Recorder
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    polls: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    thread: threading.Thread | None = None
    #: cleared to pause the poll thread (it finishes the poll under way, then waits)
    gate: threading.Event = field(default_factory=threading.Event)
    idle: threading.Event = field(default_factory=threading.Event)

    def pause(self) -> None:
        """Stop polling; returns once no poll is under way."""
        self.gate.clear()
        assert self.idle.wait(5), "poll thread did not pause"

    def resume(self) -> None:
        self.gate.set()

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        return self.session.call(operation, *args, **kwargs)

    def start_polling(self) -> None:
        self.gate.set()
        self.thread = threading.Thread(target=self._loop, name=f"poll-{self.session.name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        delay = 0.0
        while not self.stop.wait(delay):
            if not self.gate.is_set():
                self.idle.set()
                while not self.gate.wait(0.05):
                    if self.stop.is_set():
                        return
                self.idle.clear()
            try:
                t0 = time.monotonic()
                delay = self.session.poll()
                now = time.monotonic()
                self.durations.append(now - t0)
                self.polls.append(now)
            except BaseException as exc:  # noqa: BLE001  (surfaced at teardown)
                self.errors.append(exc)
                delay = 0.2


@pytest.fixture
def ecflow_session() -> Iterator[Callable[..., Running]]:
    """Factory: a started EcflowSession with a recorder and a poll thread; stopped at teardown."""
    made: list[Running] = []

    def make(port: int, known: dict[str, Event] | None = None, start: bool = True, poll: bool = True,
             **overrides: Any) -> Running:
        cfg = {"name": f"e{len(made)}", "host": "127.0.0.1", "port": port, "poll_interval": 0.05,
               "timeout": 1.0, "reconnect_backoff": 0.05, **overrides}
        run = Running(EcflowSession(EcflowSessionConfig(**cfg)), Recorder())
        made.append(run)
        if start:
            run.session.start(run.rec, known or {})
        if poll:
            run.start_polling()
        return run

    yield make
    for run in made:
        run.stop.set()
        run.gate.set()
        if run.thread is not None:
            run.thread.join(5)
        run.session.stop()
        run.session.kill()
    for run in made:
        assert not run.errors, f"poll() raised: {run.errors!r}"


def latest_states(run: Running) -> dict[str, str]:
    """The last native state the session published for every node key (removed nodes dropped)."""
    out: dict[str, str] = {}
    for e in run.rec.of(StateChanged):
        if e.key != "/":
            if e.native:
                out[e.key] = e.native
            else:
                out.pop(e.key, None)
    return out


def server_states(server: EcfServer) -> dict[str, str]:
    """The server's own display state of every node."""
    client = server.client()
    client.sync_local()
    defs = client.get_defs()
    return {n.get_abs_node_path(): str(n.get_dstate()) for n in defs.get_all_nodes()} if defs is not None else {}


def logged_finals(server: EcfServer) -> list[tuple[str, str, int]]:
    """Every task completion and abort the server wrote to its log: (path, native, try number)."""
    out = []
    for line in (server.home / "ecf.log").read_text().splitlines():
        parts = line.split("]", 1)[-1].split()
        if line.startswith("LOG:") and len(parts) >= 2 and parts[0] in ("complete:", "aborted:"):
            try_no = int(parts[3]) if len(parts) >= 4 and parts[2] == "try-no:" else 0
            out.append((parts[1], parts[0].rstrip(":"), try_no))
    return out


def missing_finals(server: EcfServer, run: Running, tasks: set[str]) -> list[tuple[str, str, int]]:
    """Logged completions/aborts of ``tasks`` that no StateChanged of the session reports."""
    seen = {(e.key, e.native, e.try_no) for e in run.rec.of(StateChanged)}
    seen_any_try = {(k, n) for k, n, _ in seen}
    return [(p, n, t) for p, n, t in logged_finals(server) if p in tasks
            and ((p, n, t) not in seen if t else (p, n) not in seen_any_try)]
