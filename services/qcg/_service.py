"""A QCG-PilotJob manager as a process of its own: ``python -m flowbus.services.qcg._service ARGS``.

Why not ``LocalManager``: it forks the calling process. Inside a Ray worker the fork inherits the
worker's gRPC port and raylet socket, so after the worker dies Ray never learns it and the actor is
never restarted (reproduced: SIGKILL of the actor, then every call times out). A fresh interpreter
started with ``close_fds`` and its own session has none of that, survives the actor (so a
restarted actor reconnects to it) and binds only 127.0.0.1.

The first line on stdout is the readiness handshake: ``QCG-READY <zmq address>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

READY = "QCG-READY "


def main(argv: list[str]) -> int:
    from qcg.pilotjob.config import Config

    Config.ZMQ_IP_ADDRESS.value["default"] = "127.0.0.1"  # QCG binds '*' otherwise (no CLI option)
    from qcg.pilotjob.service import QCGPMService
    from qcg.pilotjob.zmqinterface import ZMQInterface

    args = list(argv)
    if "--net" not in args:
        args.append("--net")
    service = QCGPMService(args)
    address = str(service.get_interfaces(ZMQInterface)[0].real_address)
    print(READY + address, flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nobody reads our stdout after the handshake
    service.start()
    return int(service.exit_code or 0)


def launch(args: list[str], log_path: Path, timeout: float = 30.0,
           cwd: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a detached manager (in ``cwd``, which its ``status`` reports as ``Wd``); return
    (process, zmq address) once it listens."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flowbus.services.qcg._service", *args],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=cwd,
                                close_fds=True, start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(READY.encode()) or (not line and proc.poll() is not None):
            break
    proc.stdout.close()
    text = line.decode(errors="replace").strip()
    if not text.startswith(READY):
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        raise RuntimeError(f"QCG manager did not start (exit code {proc.poll()}); see {log_path}")
    return proc, text[len(READY):]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
