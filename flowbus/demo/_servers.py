"""The demo's own servers: a loopback-only ``ecflow_server`` (through the LD_PRELOAD bind shim,
because ecflow_server 5.9.2 always binds 0.0.0.0) and the guiServer emulator.

Everything started here is ended by PID: the server, and every job process of its process group.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import structlog

from flowbus.schemas import BackendUnavailable

log = structlog.get_logger("flowbus.demo.servers")

#: ecFlow job header/trailer for job scripts of a loopback server (tests use them too)
HEAD_H = """\
set -e -u
export ECF_PORT=%ECF_PORT%
export ECF_HOST=%ECF_CLIENT_HOST%
export ECF_NAME=%ECF_NAME%
export ECF_PASS=%ECF_PASS%
export ECF_TRYNO=%ECF_TRYNO%
export ECF_RID=$$
export ECF_TIMEOUT=60
export PATH={bindir}:$PATH
ERROR() {{ set +e; wait; ecflow_client --abort=trap; trap 0; exit 0; }}
trap ERROR 0
trap '{{ ERROR ; }}' 1 2 3 4 5 6 7 8 10 12 13 15
ecflow_client --init=$$
"""
TAIL_H = "wait\necflow_client --complete\ntrap 0\nexit 0\n"


def ecflow_missing() -> str:
    """Why a loopback ecflow_server cannot be started here ("" when it can)."""
    if _server_bin() is None:
        return "ecflow_server is not installed (the set-up command installs it as root)"
    if shutil.which("ecflow_client", path=_PATH) is None:
        return "ecflow_client is not installed"
    if not _shim().exists():
        return (f"the loopback bind shim {_shim()} is missing (bash scripts/dev.sh setup builds it); "
                "ecflow_server would listen on every interface")
    return ""


_PATH = "/usr/sbin:/usr/bin:/bin:/usr/local/bin"


def _server_bin() -> str | None:
    return shutil.which("ecflow_server") or shutil.which("ecflow_server", path=_PATH)


def _shim() -> Path:
    return Path(sys.prefix) / "lib" / "libloopback_bind.so"


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free loopback port in ecFlow's allowed range (below Linux's ephemeral ports)."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BackendUnavailable(f"no free loopback port in {low}-{high}")


def listeners(pid: int) -> list[str]:
    """``ip:port`` of every listening socket of ``pid``."""
    try:
        conns = psutil.Process(pid).net_connections("inet")
    except psutil.Error:
        return []
    return [f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN]


class LoopbackEcflowServer:
    """One ``ecflow_server`` on 127.0.0.1 with its own ECF_HOME; ``stop()`` ends it and its jobs."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 20.0) -> LoopbackEcflowServer:
        server = _server_bin()
        if server is None or ecflow_missing():
            raise BackendUnavailable(ecflow_missing())
        client_bin = shutil.which("ecflow_client", path=_PATH) or "/usr/bin/ecflow_client"
        (self.home / "include").mkdir(parents=True, exist_ok=True)
        (self.home / "include" / "head.h").write_text(HEAD_H.format(bindir=os.path.dirname(client_bin)))
        (self.home / "include" / "tail.h").write_text(TAIL_H)
        self.port = free_port()
        env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": str(self.home), "ECF_HOME": str(self.home),
               "ECF_PORT": str(self.port), "LD_PRELOAD": str(_shim()), "ECF_LOG": str(self.home / "ecf.log"),
               "ECF_CHECK": str(self.home / "ecf.check"), "ECF_CHECKOLD": str(self.home / "ecf.check.b")}
        with open(self.home / "server.out", "ab") as out:
            self.proc = subprocess.Popen([server, "--port", str(self.port)], cwd=self.home, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         close_fds=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not listeners(self.proc.pid):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.home / "server.out").read_text(errors="replace")[-500:]
                self.stop()
                raise BackendUnavailable(f"ecflow_server on port {self.port} did not come up: {text.strip()}")
            time.sleep(0.05)
        bad = [a for a in listeners(self.proc.pid) if not a.startswith("127.")]
        if bad:
            self.stop()
            raise BackendUnavailable(f"ecflow_server listens beyond loopback ({bad}); refusing to run it")
        log.info("demo.ecflow_server.started", port=self.port, pid=self.proc.pid, home=str(self.home))
        return self

    def write_suite(self, suite: str, body: str, scripts: dict[str, str]) -> str:
        """Write ``<ECF_HOME>/<suite>/<task>.ecf`` (head and tail included); return the definition."""
        for rel, text in scripts.items():
            path = self.home / suite / f"{rel}.ecf"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("%include <head.h>\n" + textwrap.dedent(text) + "%include <tail.h>\n")
        head = (f"suite {suite}\n  edit ECF_HOME '{self.home}'\n  edit ECF_INCLUDE '{self.home}/include'\n"
                "  edit ECF_CLIENT_HOST '127.0.0.1'\n  edit ECF_TRIES '1'\n")
        return head + textwrap.indent(textwrap.dedent(body), "  ") + "endsuite\n"

    def _ours(self) -> list[psutil.Process]:
        """The server and its jobs: everything in its process group (it leads a new session)."""
        if self.proc is None:
            return []
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and os.getpgid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.Error, ProcessLookupError):
                continue
        return found

    def stop(self) -> list[str]:
        """SIGTERM the server (it checkpoints and exits), then kill any job left, by PID.
        Returns what is still alive afterwards (empty when all went)."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + 10
        while True:  # a job shell may start a command while we sweep: repeat until none is left
            procs = self._ours()
            if not procs or time.monotonic() > deadline:
                break
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=2)
        return [f"{p.pid}: {' '.join(p.cmdline())[:80]}" for p in self._ours()]
