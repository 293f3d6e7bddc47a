"""How long a state change takes from the bus to the dashboard's event stream (what the page
reads), against a plain bus subscriber in the same process as the baseline.

Starts a broker child process on an ipc socket in a temporary state dir, a publisher, a
subscriber and a :class:`~flowbus.dashboard.DashboardServer` reading the same bus, with one
Server-Sent Events stream open (as a browser holds it). Each round publishes one state change
and times its arrival at the subscriber and on the stream.

    .venv/bin/python bench/dashboard.py [--rounds N]

Last line: ``BENCH dashboard rounds=N sub_p50_ms=... sub_p99_ms=... sse_p50_ms=... sse_p99_ms=...
sse_over_sub_p50=...``. Goal (issue 13): a change is on the page within 1 s; the stream should
add little to the subscriber it is fed by.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import tempfile
import threading
import time
from pathlib import Path


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()

    from flowbus.bus import BrokerProcess, Publisher, Subscriber
    from flowbus.dashboard import DashboardServer
    from flowbus.schemas import BusConfig, DashboardConfig, State, StateChanged

    with tempfile.TemporaryDirectory(prefix="flowbus-bench-dash-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir(mode=0o700)
        broker = BrokerProcess(BusConfig(ipc_dir=str(state / "bus")), None, log_path=str(state / "broker.log"))
        broker.start()
        pub = Publisher(broker.address)
        sub = Subscriber(broker.address, "qcg/bench/")
        dash = DashboardServer(broker.address, state=state, config=DashboardConfig(port=0)).start()
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=30)
        arrivals: queue.Queue[tuple[str, float]] = queue.Queue()

        def read_stream() -> None:
            resp = conn.getresponse()
            kind = ""
            try:
                for raw in resp:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "snapshot":
                        arrivals.put(("", time.perf_counter()))  # the stream is attached
                    elif line.startswith("data: ") and kind == "ops":
                        now = time.perf_counter()
                        for op in json.loads(line[6:]):
                            if op["op"] == "row":
                                arrivals.put((op["row"]["key"], now))
            except (OSError, ValueError, AttributeError, http.client.HTTPException):  # AttributeError: closed under us
                return  # the stream closed at the end of the run

        try:
            pub.open_source("bench", "qcg")
            conn.request("GET", "/api/events", headers={"Authorization": f"Bearer {dash.token}"})
            reader = threading.Thread(target=read_stream, daemon=True)
            reader.start()
            if arrivals.get(timeout=30.0)[0] != "":
                raise RuntimeError("the stream did not start with a snapshot")
            sub_ms: list[float] = []
            sse_ms: list[float] = []
            for i in range(args.rounds + 10):  # the first 10 warm up
                key = f"job-{i}"
                t0 = time.perf_counter()
                pub.publish(StateChanged(source="bench", backend="qcg", key=key, state=State.ACTIVE))
                while True:
                    ev = sub.recv(10.0)
                    if ev is None:
                        raise RuntimeError(f"round {i}: the subscriber got nothing in 10 s")
                    if ev.key == key:
                        t_sub = time.perf_counter()
                        break
                while True:
                    got, t_sse = arrivals.get(timeout=10.0)
                    if got == key:
                        break
                if i >= 10:
                    sub_ms.append((t_sub - t0) * 1000)
                    sse_ms.append((t_sse - t0) * 1000)
        finally:
            conn.close()
            dash.stop()
            sub.close()
            pub.close()
            broker.stop()
    sub50, sse50 = pct(sub_ms, 0.5), pct(sse_ms, 0.5)
    print(f"subscriber: p50 {sub50:.2f} ms, p99 {pct(sub_ms, 0.99):.2f} ms; "
          f"dashboard stream: p50 {sse50:.2f} ms, p99 {pct(sse_ms, 0.99):.2f} ms")
    print(f"BENCH dashboard rounds={args.rounds} sub_p50_ms={sub50:.2f} sub_p99_ms={pct(sub_ms, 0.99):.2f} "
          f"sse_p50_ms={sse50:.2f} sse_p99_ms={pct(sse_ms, 0.99):.2f} sse_over_sub_p50={sse50 / max(sub50, 1e-6):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
