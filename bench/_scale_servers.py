"""Real ``ecflow_server`` processes for bench/scale.py, started in parallel batches.

Each server: 127.0.0.1 only (the LD_PRELOAD loopback bind shim), a free port in 20000-32000, its
own ECF_HOME under the run's temporary folder, ``ECF_LOG=/dev/null``. Stopped by PID and
process group (``Fleet.stop``), always from a ``finally``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import BenchError, log

REPO = Path(__file__).resolve().parents[1]
SERVER_BIN = shutil.which("ecflow_server") or shutil.which("ecflow_server", path="/usr/sbin:/usr/bin")
_serial = itertools.count()
_taken: set[int] = set()


def shim(tmp: Path) -> str:
    built = Path(sys.prefix) / "lib" / "libloopback_bind.so"
    if built.exists():
        return str(built)
    src = REPO / "scripts" / "loopback_bind.c"
    gcc = shutil.which("gcc")
    if gcc is None or not src.exists():
        raise BenchError("no loopback bind shim (run scripts/dev.sh setup); ecflow_server would bind 0.0.0.0")
    out = tmp / "libloopback_bind.so"
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"], check=True)
    return str(out)


def free_port() -> int:
    for _ in range(1000):
        port = random.randint(20000, 32000)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise BenchError("no free port")


def quick_client(port: int) -> Any:
    import ecflow

    c = ecflow.Client("127.0.0.1", str(port))
    c.set_connection_attempts(1)
    c.set_retry_connection_period(0)
    return c


class Server:
    """One ecflow_server process we started."""

    def __init__(self, root: Path, shim_path: str) -> None:
        if SERVER_BIN is None:
            raise BenchError("ecflow_server is not installed")
        self.home = root / f"ecf{next(_serial)}"
        self.home.mkdir(parents=True)
        self.port = free_port()
        env = {"PATH": "/usr/sbin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.home),
               "ECF_HOME": str(self.home), "ECF_PORT": str(self.port), "LD_PRELOAD": shim_path,
               "ECF_LOG": "/dev/null", "ECF_CHECK": str(self.home / "ecf.check"),
               "ECF_CHECKOLD": str(self.home / "ecf.check.b"), "ECF_CHECKINTERVAL": "3600"}
        with open(self.home / "server.out", "ab") as out:
            self.proc = subprocess.Popen([str(SERVER_BIN), "--port", str(self.port)], cwd=self.home, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         close_fds=True, start_new_session=True)

    def up(self) -> bool:
        """Answers a ping (restarts it from HALTED the first time)."""
        try:
            c = quick_client(self.port)
            c.ping()
            c.restart_server()
            return True
        except RuntimeError:
            if self.proc.poll() is not None:
                raise BenchError(f"ecflow_server exited: {(self.home / 'server.out').read_text()[-300:]}") from None
            return False

    def load(self, text: str) -> None:
        import ecflow

        path = self.home / "suite.def"
        path.write_text(text)
        quick_client(self.port).load(ecflow.Defs(str(path)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its group (no jobs run here)


class Fleet:
    """Many servers: started in parallel batches, each loaded with a small suite."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shim = shim(root)
        self.servers: list[Server] = []

    def start(self, n: int, budget: float, batch: int = 25, suite: str = "") -> list[Server]:
        """Start up to ``n`` more servers within ``budget`` s; returns the new ones (all up)."""
        t0 = time.monotonic()
        new: list[Server] = []
        while len(new) < n and time.monotonic() - t0 < budget:
            group = [Server(self.root, self.shim) for _ in range(min(batch, n - len(new)))]
            self.servers.extend(group)
            pending = list(group)
            deadline = time.monotonic() + 30
            while pending:
                pending = [s for s in pending if not s.up()]
                if pending and time.monotonic() > deadline:
                    raise BenchError(f"{len(pending)} ecflow_servers did not come up in 30 s")
                if pending:
                    time.sleep(0.02)
            if suite:
                for s in group:
                    s.load(suite)
            new.extend(group)
        log(f"servers: {len(new)} ecflow_server up in {time.monotonic() - t0:.1f} s (asked {n})")
        return new

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers]

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        deadline = time.monotonic() + 10
        for s in self.servers:
            try:
                s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(3)


def suite_text(name: str = "s", tasks: int = 10) -> str:
    lines = [f"suite {name}", "  family f0"]
    for t in range(tasks):
        lines += [f"    task t{t}", '      label info ""']
    lines += ["  endfamily", "endsuite"]
    return "\n".join(lines) + "\n"
