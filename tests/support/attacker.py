"""Another local user on a shared login node, trying everything against a running ``flowbus up``.

Run by tests/cli/test_trust.py as a different uid (``setpriv --reuid=65534``), with a JSON argument
naming what such a user can learn without privileges: the state dir's path and its usual socket
paths, the loopback TCP ports that listen (``ss -ltn`` shows them to everyone), and Ray's GCS
address. Prints one JSON object: per attempt, ``"refused: <why>"`` or ``"ACCEPTED: <what>"``.
Every attempt is bounded in time; nothing is sent beyond loopback.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import zmq

MB100 = 100 * 1024 * 1024


def try_unix(path: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
    except OSError as exc:
        return f"refused: {type(exc).__name__}: {exc.strerror or exc}"
    finally:
        s.close()
    return f"ACCEPTED: connected to {path}"


def try_zmq_register(endpoint: str) -> str:
    """A register frame that would take the session's source, as the bus protocol spells it."""
    from flowbus.bus import _framing as fr

    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        sock.send_multipart([fr.REGISTER, fr.pack(["local", "qcg", 0, 0, 0])], zmq.NOBLOCK)
        if sock.poll(2000, zmq.POLLIN):
            frames = sock.recv_multipart()
            if frames[0] == fr.WELCOME:
                return f"ACCEPTED: {endpoint} welcomed us: {frames!r}"[:300]
            if frames[0] == fr.REFUSED:
                return f"refused: the broker said {frames[1][:200]!r}"
            return f"refused: not a flowbus socket (it answered {frames[0][:60]!r})"
        return "refused: no answer"
    except zmq.ZMQError as exc:
        return f"refused: {exc}"
    finally:
        ctx.destroy(linger=0)


def try_publisher(request: str) -> str:
    from flowbus.bus import Publisher
    from flowbus.schemas import FlowbusError

    try:
        pub = Publisher(request, timeout=2.0)
    except FlowbusError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    try:
        pub.open_source("local", "qcg", timeout=2.0)
        return "ACCEPTED: opened source 'local'"
    except FlowbusError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    finally:
        pub.close()


def try_client(request: str) -> str:
    from flowbus.bus import Client
    from flowbus.schemas import FlowbusError

    try:
        with Client(request, timeout=2.0) as client:
            return f"ACCEPTED: snapshot of {len(client.status())} events"
    except FlowbusError as exc:
        return f"refused: {type(exc).__name__}: {exc}"


def try_tcp_bytes(port: int) -> str:
    """Garbage and a 100 MB frame header at a loopback port (what listens there must survive)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"\xff" + (MB100).to_bytes(8, "big") + b"\x7f" + b"x" * 65536)
        return "sent"
    except OSError as exc:
        return f"refused: {exc.strerror or exc}"


def try_ray(gcs: str) -> str:
    """Join flowbus's Ray as a driver and look for the Supervisor, without the token (run in a
    process of its own: see ``main``)."""
    os.environ.update(RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HOME="/tmp",
                      RAY_AUTH_TOKEN_PATH="/nonexistent/token", RAY_USAGE_STATS_ENABLED="0")
    try:
        import ray

        ray.init(address=gcs, namespace="flowbus", logging_level="ERROR", log_to_driver=False)  # type: ignore[arg-type]  # ray takes level names too
        handle = ray.get_actor("flowbus-supervisor")
        return f"ACCEPTED: joined and found {handle}"
    except Exception as exc:  # noqa: BLE001 - any failure to join is what we want to see
        last = [ln for ln in str(exc).splitlines() if ln.strip()]
        return f"refused: {type(exc).__name__}: {last[-1][:200] if last else ''}"


def main() -> int:
    plan: dict[str, Any] = json.loads(sys.argv[1])
    out: dict[str, str] = {"uid": str(os.getuid())}
    if len(sys.argv) > 2 and sys.argv[2] == "ray":
        t0 = time.monotonic()
        out["ray join"] = try_ray(plan["gcs"])
        out["ray join seconds"] = f"{time.monotonic() - t0:.1f}"
        print(json.dumps(out), flush=True)
        os._exit(0)  # Ray's threads must not keep a refused driver alive
    state = plan["state"]
    out["list_state_dir"] = (f"ACCEPTED: {os.listdir(state)}" if os.access(state, os.R_OK | os.X_OK)
                             else "refused: no access")
    for name in ("request", "publish", "owner/ingest", "owner/command"):
        out[f"unix {name}"] = try_unix(os.path.join(state, "bus", name))
    out["zmq register (ipc ingest)"] = try_zmq_register(f"ipc://{state}/bus/owner/ingest")
    out["publisher (ipc)"] = try_publisher(f"ipc://{state}/bus/request")
    out["client (ipc)"] = try_client(f"ipc://{state}/bus/request")
    for port in plan["tcp_ports"]:
        out[f"zmq register tcp:{port}"] = try_zmq_register(f"tcp://127.0.0.1:{port}")
        out[f"bytes tcp:{port}"] = try_tcp_bytes(port)
    for name in ("run.json", "keys/grant.key", "ray/auth_token"):
        try:
            with open(os.path.join(state, name)) as fh:
                out[f"read {name}"] = f"ACCEPTED: {fh.read(40)!r}"
        except OSError as exc:
            out[f"read {name}"] = f"refused: {exc.strerror}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
