"""Shared pieces of the guiServer suites: an event recorder, a host that polls, emulator and
session factories, and the ``target`` fixture (emulator, or a real guiServer: one this run starts
from ``FLOWBUS_GUISERVER_BIN``, see :class:`RealServer`, or one named by
``FLOWBUS_GUISERVER=host:port`` with ``FLOWBUS_GUISERVER_DIR`` a scratch directory on it).

A test module gets a fixture by importing ``<name>_fixture`` from here (pytest registers it under
its declared name)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowbus.schemas import GuiserverSessionConfig
from flowbus.services.guiserver import GuiserverSession
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.recorder import Recorder

REAL = os.environ.get("FLOWBUS_GUISERVER", "")
REAL_DIR = os.environ.get("FLOWBUS_GUISERVER_DIR", "/tmp/flowbus-guiserver-test")
#: a guiServer binary built from DiFX's source (docs/backends/guiserver.md, "Checked against a real guiServer")
REAL_BIN = os.environ.get("FLOWBUS_GUISERVER_BIN", "")
#: direct channel mode against a real guiServer only when asked: its ``ls`` over the back-connection crashes it
REAL_DIRECT = os.environ.get("FLOWBUS_GUISERVER_DIRECT", "") == "1"
_TOOLS = Path(__file__).with_name("gs_tools.py")
_SHIM = Path(sys.prefix) / "lib" / "libloopback_bind.so"


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``cond`` (the server's own state, which no event tells about) until truthy."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        threading.Event().wait(0.05)
    return got


def _loopback_only() -> bool:
    """Whether this process runs in a network namespace whose only interface is ``lo``."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RealServer:
    """A real guiServer (``FLOWBUS_GUISERVER_BIN``) on loopback, with stand-in DiFX tools.

    Everything lives under ``root``: ``base/bin`` (``rungeneric.DIFX-DEVEL``, ``checkmpifxcorr``,
    ``mpirun``, ``mpifxcorr``, ``vex2difx``, ``calcif2``: :mod:`support.gs_tools`), ``home`` (``~/.guiserver.lock``),
    ``tmp`` and ``data/exp``. guiServer always binds 0.0.0.0: in a network namespace that has only
    ``lo`` (``scripts/dev.sh test``) that is loopback, and the namespace gets a multicast route on
    ``lo`` so relays work; anywhere else the loopback bind shim is preloaded (TCP and UDP on
    127.0.0.1; multicast relays then do not arrive). ``outcomes`` maps job names to emulator outcomes.
    """

    def __init__(self, binary: str, root: Path, outcomes: dict[str, str] | None = None) -> None:
        self.binary, self.root = binary, root
        self.base, self.data = root / "base", root / "data" / "exp"
        self.outcomes = dict(outcomes or {})
        self.port = 0
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        #: process groups of earlier runs (crash): their jobs may still run, ended at stop()
        self._groups: list[int] = []
        self.log = root / "guiServer.log"

    def start(self) -> RealServer:
        bindir = self.base / "bin"
        for d in (bindir, self.root / "home", self.root / "tmp", self.data):
            d.mkdir(parents=True, exist_ok=True)
        (bindir / "rungeneric.DIFX-DEVEL").write_text('#!/bin/sh\nexec "$@"\n')
        for tool in ("checkmpifxcorr", "mpifxcorr", "mpirun", "vex2difx", "calcif2"):
            (bindir / tool).write_text(f'#!/bin/sh\nexec "{sys.executable}" "{_TOOLS}" {tool} "$@"\n')
        for f in bindir.iterdir():
            f.chmod(0o755)
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(self.root / "home"), "TMPDIR": str(self.root / "tmp"),
               "DIFX_BASE": str(self.base), "DIFX_USER_ID": _user(), "LANG": "C",
               "DIFX_MESSAGE_GROUP": "239.255.77.1", "DIFX_MESSAGE_PORT": str(_free_port(socket.SOCK_DGRAM)),
               "FLOWBUS_GS_OUTCOMES": json.dumps(self.outcomes)}
        if _loopback_only():
            for cmd in (["ip", "link", "set", "lo", "multicast", "on"], ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"]):
                subprocess.run(cmd, capture_output=True, check=False)  # "File exists" from an earlier server is fine
        elif _SHIM.exists():
            env["LD_PRELOAD"] = str(_SHIM)
        else:
            pytest.skip("no loopback bind shim (bash scripts/dev.sh setup builds it): guiServer would bind 0.0.0.0")
        self.env = env
        self.port = _free_port()
        return self._launch()

    def _launch(self) -> RealServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, str(self.port)], env=self.env, cwd=self.root, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._listening, 15, f"guiServer listening on 127.0.0.1:{self.port}")
        if not _loopback_only():  # the shim must have kept it on loopback
            import psutil

            from support.netcheck import off_loopback_listeners

            bad = off_loopback_listeners(psutil.Process(self.proc.pid))
            if bad:
                self.stop()
                pytest.fail(f"guiServer listens beyond loopback: {bad}")
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"guiServer exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
        return self._port_listening()

    def _port_listening(self) -> bool:
        try:
            with open("/proc/net/tcp") as fh:
                return any(line.split()[1].endswith(f":{self.port:04X}") and line.split()[3] == "0A" for line in fh)
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def crash(self) -> None:
        """SIGKILL the server process only: the jobs it started run on, as after a real crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._groups.append(self.proc.pid)
        self.proc = None

    def restart(self) -> RealServer:
        """Start the server again on the same port, with the same tools and environment, once the
        port is free: the crashed server's job processes inherited its listening socket and hold
        it until they die (on their next write to the gone server)."""
        wait_for(lambda: not self._port_listening(), 15, f"port {self.port} released by the crashed server's jobs")
        return self._launch()

    def stop(self) -> None:
        """End the server and every process it started (its process groups), by group id."""
        if self.proc is not None:
            self._groups.append(self.proc.pid)
        for group in self._groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(10)
        self.proc, self._groups = None, []


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(name="real_server")
def real_server_fixture(tmp_path: Path) -> Iterator[Callable[..., RealServer]]:
    """Makes real guiServers (skipped when ``FLOWBUS_GUISERVER_BIN`` is unset); stops them all."""
    if not REAL_BIN:
        pytest.skip("set FLOWBUS_GUISERVER_BIN to a guiServer built from DiFX's source (docs/backends/guiserver.md)")
    if not (os.path.isfile(REAL_BIN) and os.access(REAL_BIN, os.X_OK)) or shutil.which("bash") is None:
        pytest.fail(f"FLOWBUS_GUISERVER_BIN={REAL_BIN!r} is not an executable file")
    made: list[RealServer] = []

    def make(**options: Any) -> RealServer:
        srv = RealServer(REAL_BIN, tmp_path / f"real{len(made)}", **options)
        made.append(srv)
        return srv.start()

    yield make
    for srv in made:
        srv.stop()


class Host:
    """What a BackendActor does: start the session, call ``poll`` from one worker thread."""

    def __init__(self, session: GuiserverSession, rec: Recorder) -> None:
        self.session, self.rec = session, rec
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Host:
        self.session.start(self.rec, {})
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.session.poll())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.session.stop()


@pytest.fixture(name="emulator")
def emulator_fixture(tmp_path: Path) -> Iterator[Callable[..., GuiserverEmulator]]:
    made: list[GuiserverEmulator] = []

    def make(**options: Any) -> GuiserverEmulator:
        emu = GuiserverEmulator(tmp_path / f"sandbox{len(made)}", **options).start()
        made.append(emu)
        (emu.real("/data/exp")).mkdir(parents=True)
        return emu

    yield make
    for emu in made:
        emu.stop()


@pytest.fixture(name="host")
def host_fixture() -> Iterator[Callable[..., Host]]:
    made: list[Host] = []

    def make(port: int, host_name: str = "127.0.0.1", **overrides: Any) -> Host:
        options: dict[str, Any] = {"allowed_dirs": ["/data", REAL_DIR], "request_timeout": 5.0,
                                   "reconnect_backoff": 0.05, **overrides}
        cfg = GuiserverSessionConfig(name="gs", host=host_name, port=port, **options)
        h = Host(GuiserverSession(cfg), Recorder()).start()
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture(name="target", params=["emulator", "real", "emulator-direct", "real-direct"])
def target_fixture(request: pytest.FixtureRequest, emulator: Callable[..., GuiserverEmulator],
           host: Callable[..., Host]) -> tuple[Host, str]:
    """A connected session and a scratch directory, on the emulator or on a real guiServer, in
    channelled mode or in direct mode (``-direct``). Direct mode against a real guiServer runs only
    with ``FLOWBUS_GUISERVER_DIRECT=1``: its ``ls`` over the back-connection crashes the server."""
    where, _, mode = str(request.param).partition("-")
    channelled = mode != "direct"
    if where == "real":
        if not channelled and not REAL_DIRECT:
            pytest.skip("direct mode against a real guiServer crashes it on ls (set FLOWBUS_GUISERVER_DIRECT=1)")
        if REAL_BIN:
            srv: RealServer = request.getfixturevalue("real_server")()
            return host(srv.port, allowed_dirs=[str(srv.root)], channelled=channelled), str(srv.data)
        if not REAL:
            pytest.skip("set FLOWBUS_GUISERVER_BIN (a guiServer binary) or FLOWBUS_GUISERVER=host:port "
                        "to run against a real guiServer")
        name, _, port = REAL.rpartition(":")
        h = host(int(port), name, allow_remote=True, channelled=channelled)
        h.session.call("mkdir", REAL_DIR)
        return h, REAL_DIR
    return host(emulator().port, channelled=channelled), "/data/exp"


def roundtrip(h: Host, directory: str = "/data/exp") -> list[str]:
    """An ls: every packet sent before it has been handled by the server when it returns."""
    names: list[str] = h.session.call("ls", directory)
    return names


def job_host(emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host], name: str = "job_1",
             **options: Any) -> tuple[GuiserverEmulator, Host, str]:
    """An emulator with ``/data/exp/<name>.input`` and a session on it."""
    emu = emulator(**options)
    emu.real(f"/data/exp/{name}.input").write_text("# fake\n")
    return emu, host(emu.port), f"/data/exp/{name}.input"
