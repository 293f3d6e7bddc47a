"""A server that accepts connections and never answers, in a child process of its own (so its
stillness costs the test process nothing): the "hung VM / full disk" case of a backend. It binds
127.0.0.1 on a free port; what it reads is discarded; connections stay open until it is
stopped. The factory fixture kills every one it started, by PID, and waits for it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from flowbus.demo import free_port

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
        elif not s.recv(65536):
            conns.remove(s)
            s.close()
"""


class SilentServer:
    """One silent listener (see module docstring)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(self.port)], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"listening":
            self.stop()
            raise RuntimeError(f"silent server did not start (said {line!r})")

    def answers(self, timeout: float = 0.3) -> bool:
        """Whether anything comes back to a request within ``timeout`` (never, by design)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(b"       2{}")
            try:
                return bool(sock.recv(1))
            except TimeoutError:
                return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def silent_server() -> Iterator[Callable[[], SilentServer]]:
    """Factory: started silent servers; all killed (by PID) and reaped at teardown."""
    made: list[SilentServer] = []

    def make() -> SilentServer:
        server = SilentServer()
        made.append(server)
        return server

    yield make
    deadline = time.monotonic() + 10
    for server in made:
        server.stop()
    assert time.monotonic() < deadline
    assert all(s.proc.poll() is not None for s in made), "a silent server is still running"
