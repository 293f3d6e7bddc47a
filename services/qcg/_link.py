"""One connection to one QCG manager: the REQ client, our SUB socket, and (for managers the
session owns) the service process and its job processes.

Opening, probing and tearing down a manager lives here; the session (:mod:`._session`) decides
when. Functions raise QCG/ZeroMQ exceptions or :class:`BackendError` subclasses already mapped.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from flowbus.schemas import BackendError, BackendUnavailable, is_loopback

from .._base import map_errors
from ._client import (
    QCG_ERRORS,
    Pids,
    StatusSubscriber,
    TimeoutManager,
    create_time,
    descendants,
    gone,
    kill_pids,
    listener_pid,
    wait_gone,
)
from ._probe import Prober
from ._service import launch

log = structlog.get_logger("flowbus.qcg")

Client = TimeoutManager


@dataclass
class Link:
    """A live manager as the session sees it."""

    client: Client
    sub: StatusSubscriber | None
    #: True when the session must finish this manager at stop and reap its jobs on death
    owned: bool
    service_pid: int | None = None
    service_ctime: float | None = None
    #: job processes seen under the service, for orphan cleanup after a crash
    job_pids: Pids = field(default_factory=dict)
    #: the service process when this session launched it (polled, so it is reaped)
    proc: subprocess.Popen[bytes] | None = None
    #: the liveness probe (None when probing is off)
    prober: Prober | None = None

    @property
    def address(self) -> str:
        return self.client.address

    @property
    def instance_id(self) -> str:
        return self.client.instance_id

    def death(self) -> str:
        """Why the manager process is known dead, or "" (remote managers: only pings tell)."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is not None:
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                return f"manager process {self.proc.pid} ended ({how})"
            return ""
        if self.service_pid is not None and gone(self.service_pid, self.service_ctime):
            return f"manager process {self.service_pid} is gone"
        return self.prober.verdict if self.prober is not None else ""

    def track(self) -> None:
        """Record the service's current descendants (kept as they were if the service is gone)."""
        if self.service_pid is None:
            return
        pids = descendants(self.service_pid)
        if not gone(self.service_pid, self.service_ctime):
            self.job_pids = pids

    def orphans(self) -> Pids:
        """Recorded job processes plus any process still carrying this manager's address."""
        found = dict(self.job_pids)
        found.update(_by_environment(self.address, exclude={self.service_pid or -1}))
        return found

    def stop_service(self, grace_s: float, *, hard: bool = False) -> None:
        """Make sure the manager process has ended: wait ``grace_s``, then SIGTERM, then SIGKILL
        (``hard``: SIGKILL at once, for a frozen manager, which would not act on SIGTERM)."""
        pid, ctime = self.service_pid, self.service_ctime
        if pid is None or wait_gone(pid, ctime, grace_s):
            return
        for sig in (signal.SIGKILL,) if hard else (signal.SIGTERM, signal.SIGKILL):
            if gone(pid, ctime):
                return
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            wait_gone(pid, ctime, 2.0)
        if self.proc is not None:
            self.proc.poll()  # reap it

    def close(self) -> None:
        """Close the probe, sockets, the client context and QCG's log handler; never raises."""
        if self.prober is not None:
            self.prober.close()
        if self.sub is not None:
            try:
                self.sub.close()
            except Exception as exc:  # noqa: BLE001 - best effort by contract
                log.warning("qcg.sub.close_failed", error=repr(exc))
            self.sub = None
        self.client.close()
        if self.proc is not None:
            self.proc.poll()


def _by_environment(address: str, exclude: set[int]) -> Pids:
    """Processes of this user whose environment names ``address`` as their QCG manager."""
    out: Pids = {}
    me = os.getpid()
    uid = os.getuid()
    for proc in psutil.process_iter(["pid", "uids", "create_time"]):
        try:
            if proc.pid in exclude or proc.pid == me or proc.info["uids"].real != uid:
                continue
            if proc.environ().get("QCG_PM_ZMQ_ADDRESS") == address:
                out[proc.pid] = float(proc.info["create_time"])
        except (psutil.Error, OSError, AttributeError):
            continue
    return out


def _client_cfg(wdir: Path, timeout_s: float) -> dict[str, Any]:
    # 'wdir' puts QCG's client api.log under the session directory instead of the cwd
    return {"wdir": str(wdir), "poll_delay": 0.5, "init_timeout": max(10, int(timeout_s * 10))}


@dataclass(frozen=True)
class Liveness:
    """How a link probes its manager: every ``interval`` seconds, ``timeout`` seconds for the
    reply (``interval`` 0: no probe)."""

    interval: float = 0.0
    timeout: float = 1.0


def open_local(wdir: Path, nodes: str, timeout_s: float, liveness: Liveness | None = None) -> Link:
    """Start a manager bound to 127.0.0.1 with ``--wd wdir --nodes nodes`` as a process of its own.

    Not QCG's ``LocalManager``: it forks the caller, and a fork of a Ray worker keeps the worker's
    sockets open, so Ray never notices the worker died and never restarts the actor.
    """
    wdir = wdir.resolve()
    args = ["--log", "warning", "--wd", str(wdir), "--nodes", nodes]
    try:  # run in wdir: its status() reports it as 'Wd', which tells an adopting session where it is
        proc, address = launch(args, wdir / "qcg-service.log", timeout=max(10.0, timeout_s * 10), cwd=wdir)
    except (OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"start-manager: {exc}") from exc
    try:
        link = open_remote(address, wdir, timeout_s, owned=True, liveness=liveness)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    link.proc, link.service_pid, link.service_ctime = proc, proc.pid, create_time(proc.pid)
    log.info("qcg.manager.started", address=address, instance=link.instance_id, pid=proc.pid)
    return link


def open_remote(address: str, wdir: Path, timeout_s: float, owned: bool, liveness: Liveness | None = None) -> Link:
    """Connect to a running manager (one ``status`` round trip, bounded by ``timeout_s``), and
    start probing it (``liveness``).

    ``owned`` managers (a previous incarnation's LocalManager) get their service pid looked up
    by listening port, so liveness and orphan cleanup work as for our own.
    """
    with map_errors(QCG_ERRORS, "connect"):
        client = TimeoutManager(address, _client_cfg(wdir, timeout_s), timeout_s)
    try:
        sub = StatusSubscriber(client.publisher_address) if client.publisher_address else None
    except Exception:
        client.close()
        raise
    link = Link(client=client, sub=sub, owned=owned)
    if liveness is not None and liveness.interval > 0:
        link.prober = Prober(client.address, liveness.interval, liveness.timeout).start()
        client.watch(lambda: link.prober.verdict if link.prober is not None else "")
    if owned:
        pid = listener_pid(client.address)
        if pid is not None:
            link.service_pid, link.service_ctime = pid, create_time(pid)
    log.info("qcg.manager.connected", address=client.address, instance=client.instance_id,
             owned=owned, pid=link.service_pid)
    return link


def host_is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return bool(is_loopback(host))


def kill_link(link: Link) -> list[int]:
    """Immediate: SIGKILL the service we own and every job process we know of; never raises."""
    killed: list[int] = []
    try:
        pids = dict(link.job_pids)
        if link.service_pid is not None:
            pids.update(descendants(link.service_pid))
        if link.service_pid is not None and link.service_ctime is not None:
            kill_pids({link.service_pid: link.service_ctime}, grace_s=0.0)
        if link.proc is not None:
            link.proc.poll()
        pids.update(_by_environment(link.address, exclude={link.service_pid or -1}))  # launched meanwhile
        killed = kill_pids(pids, grace_s=0.2)
    except (BackendError, psutil.Error, OSError, ValueError) as exc:
        log.warning("qcg.kill.failed", error=repr(exc))
    return killed


__all__ = ["Client", "Link", "Liveness", "host_is_loopback", "kill_link", "open_local", "open_remote"]
