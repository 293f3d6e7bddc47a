"""How long one BackendActorImpl (in-process, no Ray) takes to open N real ecFlow sessions
spread over K real servers, publishing to a real broker process.

    .venv/bin/python bench/_scale_open.py --sessions 300 --servers 10

Prints ``OPEN sessions=<n> s=<total> ms_per_session=<x>``. Used for the before/after numbers of
batched opening (bench/scale.py measures the same in its lightweight-session mode).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from _common import log
from _scale_servers import Fleet, suite_text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=300)
    ap.add_argument("--servers", type=int, default=10)
    ap.add_argument("--poll", type=float, default=1.0)
    a = ap.parse_args()
    import msgspec

    from flowbus.actors import _backend_actor as ba
    from flowbus.bus import BrokerProcess
    from flowbus.schemas import BusConfig, EcflowSessionConfig

    with tempfile.TemporaryDirectory(prefix="fbopen-") as tmp:
        fleet = Fleet(Path(tmp))
        broker = BrokerProcess(BusConfig(ipc_dir=str(Path(tmp) / "bus")), None,  # ipc: the embedded default
                               log_path=str(Path(tmp) / "broker.log"))
        loop = asyncio.new_event_loop()
        impl = None
        try:
            servers = fleet.start(a.servers, 120, suite=suite_text())
            broker.start()
            specs = []
            for i in range(a.sessions):
                s = servers[i % len(servers)]
                spec = msgspec.to_builtins(EcflowSessionConfig(name=f"e{i}", host="127.0.0.1", port=s.port,
                                                               actor="bench", poll_interval=a.poll))
                spec["backend"] = "ecflow"
                specs.append(spec)
            impl = ba.BackendActorImpl("bench", broker.address, specs)
            t0 = time.monotonic()
            loop.run_until_complete(impl.start())
            dt = time.monotonic() - t0
            log(f"OPEN sessions={a.sessions} servers={len(servers)} s={dt:.2f} ms_per_session={1000 * dt / a.sessions:.1f}")
        finally:
            if impl is not None:
                try:
                    loop.run_until_complete(asyncio.wait_for(impl.stop(), 120))
                except Exception:  # noqa: BLE001 - a failed stop is followed by kill
                    impl.kill()
            loop.close()
            broker.stop()
            fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
