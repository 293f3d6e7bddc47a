"""QCG-PilotJob client plumbing: request timeouts, loopback-only managers, the status SUB socket,
and job-process bookkeeping for orphan cleanup.

Everything here raises QCG's, ZeroMQ's or this module's own exceptions; :data:`QCG_ERRORS` is the
map :func:`flowbus.services.map_errors` applies at the adapter edge (the session and its
operations).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import psutil
import structlog
import zmq
from qcg.pilotjob.api import errors as qcg_errors
from qcg.pilotjob.api.manager import Manager
from qcg.pilotjob.publisher import StatusPublisher

from flowbus.schemas import BackendError, BackendProtocolError, BackendRejected, BackendTimeout, BackendUnavailable

log = structlog.get_logger("flowbus.qcg")

#: what every QCG service started from this process binds (REP and PUB sockets)
LOOPBACK = "127.0.0.1"
#: the slice in which a request's wait for its reply checks the liveness verdict
_SLICE_S = 0.05


class ManagerRefused(Exception):
    """The manager answered with a non-zero code; ``args[0]`` is its message."""


class ManagerTimeout(TimeoutError):
    """The manager did not answer within the request timeout."""


class ManagerGone(Exception):
    """The manager process is known to be dead, or the session holds no manager."""


#: QCG/ZeroMQ failure -> flowbus error; order matters (first ``isinstance`` match wins)
QCG_ERRORS: Mapping[type[BaseException], type[BackendError]] = {
    ManagerRefused: BackendRejected,
    qcg_errors.InvalidJobDescriptionError: BackendRejected,
    qcg_errors.JobNotDefinedError: BackendRejected,
    qcg_errors.WrongArgumentsError: BackendRejected,
    ManagerTimeout: BackendTimeout,
    qcg_errors.TimeoutElapsed: BackendTimeout,
    ManagerGone: BackendUnavailable,
    qcg_errors.ConnectionError: BackendUnavailable,
    qcg_errors.ServiceError: BackendUnavailable,
    zmq.ZMQError: BackendUnavailable,
    OSError: BackendUnavailable,
    qcg_errors.InternalError: BackendProtocolError,
    ValueError: BackendProtocolError,
}


class _TimeoutClient:
    """Mixin for QCG's ``Manager``: bounded requests, no private SUB socket, clean teardown.

    * every request gives up after ``timeout_s`` (``ManagerTimeout``), or as soon as a watched
      liveness verdict names a reason (``ManagerGone``, see :meth:`watch`), and the REQ socket is
      recreated, so the next request does not fail with EFSM;
    * refusals become ``ManagerRefused`` carrying the manager's message;
    * QCG's own SUB socket (which buffers stale events forever) is never opened: the session
      reads the publisher itself.
    """

    _zmq_ctx: zmq.Context[Any]
    _zmq_socket: zmq.Socket[Any] | None
    _connected: bool
    _address: str
    _publisher_address: str | None
    _timeout_ms: int
    _verdict: Callable[[], str] | None = None
    system_info: dict[str, Any]

    def _connect(self) -> None:
        for opt in (zmq.RCVTIMEO, zmq.SNDTIMEO):
            self._zmq_ctx.setsockopt(opt, self._timeout_ms)
        self._zmq_ctx.setsockopt(zmq.LINGER, 0)
        self._zmq_socket = self._zmq_ctx.socket(zmq.REQ)
        self._zmq_socket.connect(self._address)
        self._connected = True
        status = self._send_and_validate_result({"request": "status"})
        self.system_info = dict(status.get("System", {}))
        self._publisher_address = self.system_info.get("StatusPublisher")

    def _reset_socket(self) -> None:
        if self._zmq_socket is not None:
            self._zmq_socket.close(0)
        self._zmq_socket = self._zmq_ctx.socket(zmq.REQ)
        self._zmq_socket.connect(self._address)

    def watch(self, verdict: Callable[[], str]) -> None:
        """Cut a request short as soon as ``verdict()`` names a reason (a liveness probe found
        the manager dead or frozen): it then raises ``ManagerGone`` with that reason."""
        self._verdict = verdict

    def _send_and_validate_result(self, data: dict[str, Any], valid_method: Any = None) -> Any:
        """QCG's request/reply, with the wait bounded and interruptible (QCG's blocks forever)."""
        validate = valid_method or Manager._validate_response
        self._assure_connected()  # type: ignore[attr-defined]  # from qcg's Manager
        sock = self._zmq_socket
        assert sock is not None
        verdict = self._verdict
        try:
            sock.send(json.dumps(data).encode())
            deadline = time.monotonic() + self._timeout_ms / 1000
            while True:
                gone_why = verdict() if verdict is not None else ""
                if gone_why:
                    self._reset_socket()
                    raise ManagerGone(f"{data.get('request')}: {gone_why}")
                left = deadline - time.monotonic()
                if left <= 0:
                    if sock.poll(0):  # answered while this process could not look
                        break
                    raise zmq.Again
                if sock.poll(int(min(_SLICE_S, left) * 1000) + 1):
                    break
            reply = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            self._reset_socket()
            raise ManagerTimeout(f"no reply from QCG manager {self._address} within "
                                 f"{self._timeout_ms / 1000:g} s ({data.get('request')})") from None
        except zmq.ZMQError:
            self._reset_socket()
            raise
        try:
            return validate(json.loads(reply))
        except qcg_errors.ConnectionError as exc:
            text = str(exc.args[0]) if exc.args else str(exc)
            if text.startswith("Request failed"):
                raise ManagerRefused(text.removeprefix("Request failed - ")) from exc
            raise

    def _send_finish(self) -> None:
        self._send_and_validate_result({"request": "finish"})
        self._disconnect()  # type: ignore[attr-defined]  # from qcg's Manager

    @property
    def instance_id(self) -> str:
        return str(self.system_info.get("InstanceId", ""))

    @property
    def address(self) -> str:
        return self._address

    @property
    def publisher_address(self) -> str:
        return self._publisher_address or ""

    def close(self) -> None:
        """Close the sockets and the context and remove QCG's log handler; never raises."""
        try:
            if getattr(self, "_zmq_socket", None) is not None:
                self._zmq_socket.close(0)  # type: ignore[union-attr]  # checked just above
                self._zmq_socket = None
            self._connected = False
            ctx = getattr(self, "_zmq_ctx", None)
            if ctx is not None and not ctx.closed:
                ctx.term()
        except Exception as exc:  # noqa: BLE001 - best effort by contract
            log.warning("qcg.client.close_failed", error=repr(exc))
        try:
            self.cleanup()  # type: ignore[attr-defined]  # from qcg's Manager
        except Exception as exc:  # noqa: BLE001 - best effort by contract
            log.warning("qcg.client.cleanup_failed", error=repr(exc))


class TimeoutManager(_TimeoutClient, Manager):  # type: ignore[misc]  # qcg is untyped
    """A client of a running manager; the constructor does one ``status`` round trip."""

    def __init__(self, address: str, cfg: dict[str, Any], timeout_s: float) -> None:
        self._timeout_ms = max(1, int(timeout_s * 1000))
        self.system_info = {}
        try:
            super().__init__(address, cfg)
        except BaseException:
            self.close()
            raise


class StatusSubscriber:
    """Our own SUB socket on QCG's status publisher (``"<TOPIC> <json>"`` strings)."""

    def __init__(self, address: str, hwm: int = 100_000) -> None:
        self.address = address
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock: zmq.Socket[Any] = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt_string(zmq.SUBSCRIBE, "")
        self._sock.connect(address)
        self.dropped = 0

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a message; True if one is ready."""
        return bool(self._sock.poll(int(timeout_s * 1000)))

    def drain(self, limit: int = 5000) -> list[tuple[str, dict[str, Any]]]:
        """Every message ready now (at most ``limit``), decoded as ``(topic, data)``."""
        out: list[tuple[str, dict[str, Any]]] = []
        while len(out) < limit:
            try:
                raw = self._sock.recv_string(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                topic, data = StatusPublisher.decode_published_data(raw)
            except Exception as exc:  # noqa: BLE001 - QCG raises its own unrelated types here
                self.dropped += 1
                log.warning("qcg.event.undecodable", error=str(exc), raw=raw[:200])
                continue
            if isinstance(data, dict):
                out.append((str(topic.value), data))
        return out

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()


# -- processes -------------------------------------------------------------------------------------

#: pid -> create_time; a pid is only signalled while its create_time still matches
Pids = dict[int, float]


def descendants(pid: int) -> Pids:
    """Every live descendant of ``pid`` with its create_time (empty if ``pid`` is gone)."""
    out: Pids = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return out
    for child in children:
        try:
            out[child.pid] = child.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same(pid: int, ctime: float) -> psutil.Process | None:
    """The process ``pid`` if it is still the one created at ``ctime`` and not a zombie."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - ctime) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def gone(pid: int, ctime: float | None = None) -> bool:
    """True if ``pid`` no longer runs (exited, a zombie, or the pid was reused)."""
    try:
        proc = psutil.Process(pid)
        if ctime is not None and abs(proc.create_time() - ctime) > 0.05:
            return True
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def kill_pids(pids: Mapping[int, float], grace_s: float = 0.5) -> list[int]:
    """SIGTERM the still-matching ``pids``, SIGKILL what survives ``grace_s``; never raises.

    Returns the pids that were signalled. Zombies count as gone (PID 1 may never reap them).
    """
    procs: list[tuple[psutil.Process, float]] = []
    for pid, ctime in pids.items():
        if pid == os.getpid():
            continue
        proc = _same(pid, ctime)
        if proc is not None:
            procs.append((proc, ctime))
    signalled = [p.pid for p, _ in procs]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc, _ in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.send_signal(sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not all(gone(p.pid, c) for p, c in procs):
            time.sleep(0.02)
        procs = [(p, c) for p, c in procs if not gone(p.pid, c)]
        if not procs:
            break
    return signalled


def wait_gone(pid: int, ctime: float | None, timeout_s: float) -> bool:
    """Poll until ``pid`` is gone or ``timeout_s`` passes; True if gone."""
    deadline = time.monotonic() + timeout_s
    while not gone(pid, ctime):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def listener_pid(address: str) -> int | None:
    """The pid of the local process listening on the TCP port of ``address`` (``tcp://h:p``)."""
    try:
        port = int(address.rsplit(":", 1)[1])
        conns = psutil.net_connections(kind="tcp")
    except (ValueError, IndexError, psutil.Error, OSError):
        return None
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


__all__ = [
    "LOOPBACK",
    "QCG_ERRORS",
    "ManagerGone",
    "ManagerRefused",
    "ManagerTimeout",
    "Pids",
    "StatusSubscriber",
    "TimeoutManager",
    "create_time",
    "descendants",
    "gone",
    "kill_pids",
    "listener_pid",
    "wait_gone",
]
