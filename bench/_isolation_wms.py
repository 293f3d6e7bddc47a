"""The ctrl_bps WMS half of ``bench/isolation.py``: a reporting ``BaseWmsService`` whose
``ping()`` and ``report()`` first make one round trip to a WMS server process (an echo server,
one per session; blocking, no timeout of its own, as HTCondor's schedd queries or PanDA's HTTP
calls), and whose runs change when the bench says so.

Each healthy session ``watch``es runs of a process-wide table; a change is the bench setting a
run to SUCCEEDED at wall time ``t0``; detection = when its ``StateChanged`` reached the bus
minus ``t0`` (the session reports every ``report-interval``, so about half of it on average).
The frozen neighbour's server is SIGSTOPped.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

from lsst.ctrl.bps import BaseWmsService, WmsJobReport, WmsRunReport, WmsStates

#: ``<wms id>`` -> state; the bench changes them
RUNS: dict[str, WmsStates] = {}
_LOCK = threading.Lock()
#: the echo server each class (by name) asks
PORTS: dict[str, int] = {}

ECHO = """
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


def echo_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", ECHO, str(port)], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"listening":
        proc.kill()
        proc.wait(10)
        raise RuntimeError("echo server did not start")
    return proc


class _Remote(BaseWmsService):  # type: ignore[misc]  # lsst ctrl_bps is untyped
    def _ask(self) -> None:
        with socket.create_connection(("127.0.0.1", PORTS[type(self).__name__])) as sock:
            sock.sendall(b"?")
            if not sock.recv(1):
                raise ConnectionError("the WMS server closed the connection")

    def ping(self, pass_thru: str | None) -> tuple[int, str]:
        self._ask()
        return 0, ""

    def report(self, wms_workflow_id: str | None = None, user: str | None = None, hist: float = 0,
               pass_thru: str | None = None, is_global: bool = False,
               return_exit_codes: bool = False) -> tuple[list[WmsRunReport], str]:
        self._ask()
        with _LOCK:
            state = RUNS.get(str(wms_workflow_id))
        if state is None:
            return [], f"no run {wms_workflow_id!r}"
        job = WmsJobReport(wms_id=f"{wms_workflow_id}.a", name="a", label="a", state=state)
        rep = WmsRunReport(wms_id=str(wms_workflow_id), path="", label="b", run="b", operator="bench", state=state,
                           total_number_jobs=1, job_state_counts={s: int(s is state) for s in WmsStates},
                           run_summary="a:1")
        rep.jobs = [job]
        return [rep], ""


def service(name: str, port: int) -> str:
    """A reporting service class asking the echo server on ``port``; returns its class path."""
    PORTS[name] = port
    globals()[name] = type(name, (_Remote,), {"__module__": __name__})
    return f"{__name__}.{name}"


def new_run(wms_id: str) -> None:
    with _LOCK:
        RUNS[wms_id] = WmsStates.RUNNING


def finish(wms_id: str) -> None:
    with _LOCK:
        RUNS[wms_id] = WmsStates.SUCCEEDED


__all__ = ["PORTS", "RUNS", "echo_server", "finish", "new_run", "service"]
