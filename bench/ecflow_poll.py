"""ecFlow benchmark: change detection and watching cost of flowbus's ecFlow session against real
``ecflow_server`` processes, compared in the same run with the naive loop scripts use today
(``get_server_defs()`` every interval).

    .venv/bin/python bench/ecflow_poll.py [--quick] [--servers N] [--json PATH]

Every server is a real ``ecflow_server`` on 127.0.0.1 (LD_PRELOAD loopback bind shim, built by
``scripts/dev.sh`` or here from ``scripts/loopback_bind.c``), a free port in 1024-49151, its own
ECF_HOME in a temporary directory and ``ECF_LOG=/dev/null``. Suites are loaded but never begun,
so no job runs. Every server is stopped by PID (and its process group) in ``finally``.

Scenarios:

* big: one server with a 5,000-task suite (50 families x 100 tasks, each with a label). One
  ``EcflowSession`` at the default poll interval, polled by a thread like the actor's. A mutator
  (a separate ``ecflow.Client`` in this process, same clock) changes the label of a random task
  at random moments; latency = emit time of the matching ``AttributeChanged`` minus the time just
  before the ``alter`` call. Then idle CPU of the watching process over a window, and the same
  window for the naive loop against the same server.
* many: N servers (small suite each), all watched by one in-process ``BackendActorImpl`` (the
  Ray actor's body, publishing to a real broker process; no Ray). Labels are changed on random
  servers; p99 latency; idle CPU of this process / N as % of one core (the broker process is
  not counted). The actor body opens the sessions in one batch (one registration round, one
  snapshot, a few ``start()`` at a time: about 3 ms per session at 300-1,000 sessions; see
  ``bench/scale.py`` for hundreds of servers). Then the naive loop (one thread per server, ``get_server_defs()`` every
  interval) on the same servers for the same window.

The last line is

    BENCH ecflow p50_ms= p99_ms= cpu_pct_per_server= servers= p99_ms_many= naive_ratio=

``p50_ms``/``p99_ms`` from the 5,000-task run, ``cpu_pct_per_server`` and ``p99_ms_many`` from
the many-server run, ``servers`` the number watched by the one actor body, ``naive_ratio`` =
flowbus CPU per server / naive-loop CPU per server on the 5,000-task server (the many-server
ratio is printed above it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _scale_servers
from _common import BenchError, Noise, cpu_s, log, median, percentile
from _scale_servers import quick_client, shim

SERVER_BIN = _scale_servers.SERVER_BIN


# -- servers -------------------------------------------------------------------------------------------


class Server(_scale_servers.Server):
    """One ecflow_server process we started (``bench/_scale_servers.py``), with a bounded wait."""

    def __init__(self, root: Path, n: int, shim_path: str) -> None:
        super().__init__(root, shim_path)

    def ready(self, deadline: float) -> None:
        """Wait until it answers a ping (and is restarted from HALTED)."""
        while not self.up():
            if time.monotonic() > deadline:
                raise BenchError(f"ecflow_server on {self.port} did not come up")
            time.sleep(0.01)


def start_servers(root: Path, n: int, shim_path: str, out: list[Server], budget: float) -> None:
    """Start up to ``n`` servers (appended to ``out`` as they start); stops early at ``budget`` s."""
    t0 = time.monotonic()
    batch = 10
    while len(out) < n and time.monotonic() - t0 < budget:
        new = [Server(root, len(out) + i, shim_path) for i in range(min(batch, n - len(out)))]
        out.extend(new)
        for s in new:
            s.ready(time.monotonic() + 15)


def suite_text(name: str, families: int, tasks: int) -> str:
    lines = [f"suite {name}"]
    for f in range(families):
        lines.append(f"  family f{f}")
        for t in range(tasks):  # like the notes' cost table: event, meter, label and trigger per task
            lines += [f"    task t{t}", "      event ev", "      meter progress 0 10 10", "      label info \"\""]
            if t:
                lines.append(f"      trigger t{t - 1} == complete")
        lines.append("  endfamily")
    lines.append("endsuite")
    return "\n".join(lines) + "\n"


# -- measuring -------------------------------------------------------------------------------------------


class Detections:
    """Emit timestamps of label values (the mutator writes unique values)."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self.events = 0

    def record(self, event: Any) -> None:
        now = time.monotonic()
        with self.cond:
            self.events += 1
            if getattr(event, "kind", None) == "label" and isinstance(event.value, str) and event.value.startswith("m"):
                self.seen.setdefault(event.value, now)
                self.cond.notify_all()

    def wait(self, value: str, timeout: float) -> float | None:
        with self.cond:
            if self.cond.wait_for(lambda: value in self.seen, timeout):
                return self.seen[value]
            return None


def mutate(ports_paths: list[tuple[int, str]], changes: int, gap: tuple[float, float], det: Detections,
           timeout: float = 5.0) -> tuple[list[float], int]:
    """Change labels at random moments; returns detection latencies (ms) and misses."""
    clients: dict[int, Any] = {}
    lat: list[float] = []
    missed = 0
    for i in range(changes):
        port, path = random.choice(ports_paths)
        c = clients.get(port) or clients.setdefault(port, quick_client(port))
        value = f"m{i}-{random.random():.6f}"
        time.sleep(random.uniform(*gap))
        t0 = time.monotonic()
        c.alter(path, "change", "label", "info", value)
        seen = det.wait(value, timeout)
        if seen is None:
            missed += 1
        else:
            lat.append((seen - t0) * 1000)
    return lat, missed


def idle_cpu(window: float) -> tuple[float, float]:
    """Process CPU in % of one core over ``window`` s, and the foreign load (cores)."""
    c0, t0 = cpu_s(), time.monotonic()
    with Noise() as noise:
        time.sleep(window)
    used = cpu_s() - c0
    return used / (time.monotonic() - t0) * 100, noise.foreign_cores(used)


def naive_cpu(ports: list[int], interval: float, window: float) -> tuple[float, int]:
    """The naive loop, one thread per server: ``get_server_defs()`` then sleep ``interval``.
    Returns process CPU in % of one core over ``window`` and the number of calls."""
    stop = threading.Event()
    calls = [0]

    def loop(port: int) -> None:
        c = quick_client(port)
        while not stop.is_set():
            try:
                c.get_server_defs()
                calls[0] += 1
            except RuntimeError:
                pass
            stop.wait(interval)

    threads = [threading.Thread(target=loop, args=(p,), daemon=True) for p in ports]
    for t in threads:
        t.start()
    time.sleep(min(1.0, window / 4))  # warm up: first fetches
    calls[0] = 0
    pct, _ = idle_cpu(window)
    n = calls[0]
    stop.set()
    for t in threads:
        t.join(5)
    return pct, n


class PollThread:
    """A session polled like the actor's ``_Hosted.run_polls``."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                delay = self.session.poll()
            except Exception as exc:  # noqa: BLE001 - counted in the report; polling goes on
                self.errors.append(repr(exc))
                delay = 1.0
            self.stop.wait(max(0.005, min(delay, 1.0)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.session.stop()


# -- scenarios ---------------------------------------------------------------------------------------------


def run_big(root: Path, shim_path: str, servers: list[Server], changes: int, window: float) -> dict[str, Any]:
    from flowbus.schemas import EcflowSessionConfig
    from flowbus.services.ecflow import EcflowSession

    t0 = time.monotonic()
    start_servers(root, 1, shim_path, servers, 30)
    big = servers[-1]
    big.load(suite_text("big", 50, 100))
    probe = quick_client(big.port)
    probe.sync_local()
    if len(list(probe.get_defs().get_all_tasks())) != 5000:
        raise BenchError("big: the server does not hold 5,000 tasks")
    log(f"big: server up and 5,000-task suite loaded in {time.monotonic() - t0:.1f} s")
    cfg = EcflowSessionConfig(name="big", host="127.0.0.1", port=big.port)
    interval = cfg.poll_interval
    det = Detections()
    session = EcflowSession(cfg)
    session.start(det.record, {})
    poller = PollThread(session)
    try:
        paths = [(big.port, f"/big/f{f}/t{t}") for f in range(50) for t in range(100)]
        lat, missed = mutate(paths, changes, (0.05, 0.35), det)
        time.sleep(2 * interval)
        pct, foreign = idle_cpu(window)
    finally:
        poller.close()
    if poller.errors:
        raise BenchError(f"big: poll errors {poller.errors[:3]}")
    npct, ncalls = naive_cpu([big.port], interval, window)
    out = {"interval_s": interval, "changes": changes, "missed": missed, "p50_ms": median(lat),
           "p99_ms": percentile(lat, 99), "max_ms": max(lat) if lat else float("nan"), "cpu_pct": pct,
           "naive_cpu_pct": npct, "naive_calls_per_s": ncalls / window, "foreign_cores": foreign}
    out["naive_ratio"] = pct / npct if npct > 0 else float("nan")
    log(f"big: {changes} label changes, missed {missed}: p50 {out['p50_ms']:.1f} ms p99 {out['p99_ms']:.1f} ms "
        f"max {out['max_ms']:.1f} ms (interval {interval} s)")
    log(f"big: idle watching {pct:.2f} % of a core; naive get_server_defs loop {npct:.2f} % "
        f"({ncalls / window:.1f} calls/s) -> ratio {out['naive_ratio']:.3f} (foreign {foreign:.2f} cores)")
    return out


def run_many(root: Path, shim_path: str, servers: list[Server], n: int, changes: int, window: float,
             budget: float) -> dict[str, Any]:
    import asyncio

    import msgspec

    from flowbus.actors import _backend_actor as ba
    from flowbus.bus import BrokerProcess
    from flowbus.schemas import BusConfig, EcflowSessionConfig

    first = len(servers)
    t0 = time.monotonic()
    start_servers(root, n, shim_path, servers, budget)
    many = servers[first:]
    text = suite_text("s", 1, 10)
    for s in many:
        s.load(text)
    log(f"many: {len(many)} servers up and loaded in {time.monotonic() - t0:.1f} s (asked {n})")

    det = Detections()
    orig_emit = ba._Hosted.emit

    def emit(self: Any, event: Any) -> None:
        det.record(event)
        orig_emit(self, event)

    broker = BrokerProcess(BusConfig(ipc_dir=str(root / "bus")), None,  # ipc: the embedded default
                           log_path=str(root / "broker.log"))
    broker.start()
    loop = asyncio.new_event_loop()
    impl = None
    try:
        ba._Hosted.emit = emit  # type: ignore[method-assign]  # timed for the bench, restored below
        specs = [msgspec.to_builtins(EcflowSessionConfig(name=f"e{i}", host="127.0.0.1", port=s.port, actor="bench"))
                 for i, s in enumerate(many)]
        for spec in specs:
            spec["backend"] = "ecflow"
        impl = ba.BackendActorImpl("bench", broker.address, specs)
        t1 = time.monotonic()
        loop.run_until_complete(impl.start())
        log(f"many: one BackendActorImpl opened {len(many)} sessions in {time.monotonic() - t1:.1f} s")
        interval = EcflowSessionConfig(name="x").poll_interval
        time.sleep(3 * interval)
        pct, foreign = idle_cpu(window)
        paths = [(s.port, f"/s/f0/t{t}") for s in many for t in range(10)]
        lat, missed = mutate(paths, changes, (0.02, 0.1), det)
        errors = sum(h.poll_errors for h in impl._hosted.values())
    finally:
        ba._Hosted.emit = orig_emit  # type: ignore[method-assign]  # restored
        if impl is not None:
            try:
                loop.run_until_complete(asyncio.wait_for(impl.stop(), 60))
            except Exception:  # noqa: BLE001 - a failed stop is followed by kill
                impl.kill()
            impl._pool.shutdown(wait=False)
        loop.close()
        broker.stop()
    if errors:
        raise BenchError(f"many: {errors} poll errors")
    ports = [s.port for s in many]
    npct, ncalls = naive_cpu(ports, interval, window)
    k = len(many)
    out = {"servers": k, "changes": changes, "missed": missed, "p50_ms": median(lat), "p99_ms": percentile(lat, 99),
           "max_ms": max(lat) if lat else float("nan"), "cpu_pct": pct, "cpu_pct_per_server": pct / k,
           "naive_cpu_pct": npct, "naive_cpu_pct_per_server": npct / k, "naive_calls_per_s": ncalls / window,
           "foreign_cores": foreign}
    out["naive_ratio"] = pct / npct if npct > 0 else float("nan")
    log(f"many: {k} servers, {changes} label changes, missed {missed}: p50 {out['p50_ms']:.1f} ms "
        f"p99 {out['p99_ms']:.1f} ms max {out['max_ms']:.1f} ms")
    log(f"many: idle watching {pct:.1f} % of a core = {pct / k:.3f} %/server; naive loop {npct:.1f} % "
        f"= {npct / k:.3f} %/server ({ncalls / window:.0f} calls/s) -> ratio {out['naive_ratio']:.3f} "
        f"(foreign {foreign:.2f} cores)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer servers and changes (< 60 s)")
    ap.add_argument("--servers", type=int, default=None, help="servers for the many-server run (default 300, quick 20)")
    ap.add_argument("--json", help="also write all results to this file")
    args = ap.parse_args()
    if SERVER_BIN is None:
        raise BenchError("ecflow_server is not installed (bash scripts/dev.sh setup)")
    n = args.servers or (20 if args.quick else 300)
    changes, changes_many, window = (20, 40, 4.0) if args.quick else (60, 150, 8.0)
    budget = 25.0 if args.quick else 70.0

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    root = Path(tempfile.mkdtemp(prefix="flowbus-bench-ecflow-"))
    servers: list[Server] = []
    t0 = time.monotonic()
    try:
        shim_path = shim(root)
        big = run_big(root, shim_path, servers, changes, window)
        servers.pop().stop()  # the 5,000-task server is done
        many = run_many(root, shim_path, servers, n, changes_many, window, budget)
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                log(f"stop of server {s.port} failed: {exc!r}")
        shutil.rmtree(root, ignore_errors=True)
    log(f"total {time.monotonic() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"big": big, "many": many}, indent=2))

    def f(x: float, nd: int = 1) -> str:
        return "nan" if math.isnan(x) else f"{x:.{nd}f}"

    print(f"BENCH ecflow p50_ms={f(big['p50_ms'])} p99_ms={f(big['p99_ms'])} "
          f"cpu_pct_per_server={f(many['cpu_pct_per_server'], 3)} servers={many['servers']} "
          f"p99_ms_many={f(many['p99_ms'])} naive_ratio={f(big['naive_ratio'], 3)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
