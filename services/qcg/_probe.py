"""A liveness probe of one QCG manager: a thread and a REQ socket of its own that ask the
manager's ``status`` every ``interval`` seconds and give a verdict when one reply does not come
within ``timeout`` seconds (the manager died, or is alive but frozen, e.g. SIGSTOPped).

The probe never takes the session lock, so a request of the session's own client that hangs on a
frozen manager does not delay it; that request is cut short by the verdict instead (see
``_TimeoutClient.watch`` in :mod:`._client`). A manager that stops answering is thus reported
within ``interval + timeout`` plus one poll of the session (50 ms).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog
import zmq

log = structlog.get_logger("flowbus.qcg")

#: the request the probe sends: QCG's system status, answered from memory (about 1.5 ms)
_REQUEST = b'{"request": "status"}'
#: the slice in which the probe's waits check whether it was closed
_SLICE_S = 0.05


class Prober:
    """Ask ``address`` for its status every ``interval`` seconds; :attr:`verdict` is "" while
    every reply came within ``timeout`` seconds, then the reason the manager is lost (set once,
    after which the probe stops)."""

    def __init__(self, address: str, interval: float, timeout: float) -> None:
        self.address = address
        self.interval = interval
        self.timeout = timeout
        self.verdict = ""
        #: probes answered, and the slowest reply in seconds (for logs and tests)
        self.answered = 0
        self.slowest = 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"qcg-probe {address}", daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def close(self, join_s: float = 0.2) -> None:
        """Stop probing; the thread ends within one slice (never raises)."""
        self._closed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(join_s)

    def _run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock: zmq.Socket[Any] | None = None
        try:
            while not self._closed.wait(self.interval):
                if sock is None:
                    sock = ctx.socket(zmq.REQ)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(self.address)
                started = time.monotonic()
                sock.send(_REQUEST)
                if not self._reply(sock, started):
                    return
                sock.recv()
                took = time.monotonic() - started
                self.answered += 1
                self.slowest = max(self.slowest, took)
        except zmq.ZMQError as exc:
            if not self._closed.is_set():
                self.verdict = f"liveness probe of QCG manager {self.address} failed: {exc}"
        finally:
            if sock is not None:
                sock.close(0)
            ctx.term()
            if self.verdict:
                log.warning("qcg.probe.failed", address=self.address, verdict=self.verdict)

    def _reply(self, sock: zmq.Socket[Any], started: float) -> bool:
        """Wait for the reply in slices; False when closed meanwhile or the timeout passed (then
        :attr:`verdict` says so)."""
        deadline = started + self.timeout
        while not self._closed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                if sock.poll(0):  # answered while this process could not look (e.g. it was stopped)
                    return True
                self.verdict = (f"QCG manager {self.address} did not answer a liveness probe within "
                                f"{self.timeout:g} s (dead or frozen)")
                return False
            if sock.poll(int(min(_SLICE_S, left) * 1000) + 1):
                return True
        return False


__all__ = ["Prober"]
