"""A ctrl_bps service that reaches a WMS server process, for the frozen-WMS tests.

HTCondor's schedd queries and PanDA's HTTP calls block inside the plugin until the server
answers. :func:`remote_service` makes a :class:`~support.wms.SteppingService` whose ``ping()``
and ``report()`` first make one round trip to a server on 127.0.0.1 (one byte out, one byte back,
no timeout of their own, as a plugin that trusts its server). :class:`EchoServer` is such a
server, in a child process of its own: SIGSTOP it and the WMS stops answering; point the service
at a silent listener (``support.silent``) and it accepts connections but never replies. The
``echo_server`` factory fixture resumes and kills every one it started, by PID, and waits for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowbus.demo import free_port
from support.wms import SteppingService

_CHILD = """
import select, socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(512)
print("listening", flush=True)
conns = []
while True:
    ready, _, _ = select.select([ls, *conns], [], [])
    for s in ready:
        if s is ls:
            conns.append(ls.accept()[0])
            continue
        try:
            data = s.recv(65536)
            if data:
                s.sendall(data)
                continue
        except OSError:
            pass
        conns.remove(s)
        s.close()
"""


class EchoServer:
    """A WMS server stand-in that answers every byte it reads, in a child process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stopped = False
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(self.port)], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"listening":
            self.end()
            raise RuntimeError(f"echo server did not start (said {line!r})")

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        if self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.stopped = False

    def end(self) -> None:
        if self.proc.poll() is None:
            self.thaw()
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _round_trip(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"?")
        if not sock.recv(1):
            raise ConnectionError(f"the WMS server on port {port} closed the connection")


def remote_service(name: str, port: int) -> str:
    """A SteppingService subclass whose ping() and report() first ask the server on ``port``,
    registered as this module's attribute ``name``; returns its class path (``service-class``)."""

    def ping(self: Any, pass_thru: str | None) -> tuple[int, str]:
        _round_trip(port)
        return SteppingService.ping(self, pass_thru)

    def report(self: Any, wms_workflow_id: str | None = None, user: str | None = None, hist: float = 0,
               pass_thru: str | None = None, is_global: bool = False, return_exit_codes: bool = False) -> Any:
        _round_trip(port)
        return SteppingService.report(self, wms_workflow_id, user, hist, pass_thru, is_global, return_exit_codes)

    globals()[name] = type(name, (SteppingService,), {"ping": ping, "report": report, "__module__": __name__})
    return f"{__name__}.{name}"


@pytest.fixture
def echo_server() -> Iterator[Callable[[], EchoServer]]:
    """Factory: started echo servers; all resumed, killed (by PID) and reaped at teardown."""
    made: list[EchoServer] = []

    def make() -> EchoServer:
        server = EchoServer()
        made.append(server)
        return server

    yield make
    deadline = time.monotonic() + 15
    for server in made:
        server.end()
    assert time.monotonic() < deadline
    assert all(s.proc.poll() is not None for s in made), "an echo server is still running"
