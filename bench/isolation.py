"""Isolation per backend, apart from bench/scale.py: one in-process ``BackendActorImpl`` (the
Ray actor's body, so every session shares this process's GIL) hosts N healthy sessions and one
more; the healthy sessions' detection latency is timed with that one healthy, then with it
frozen (timed from when the actor's ``ping()`` names it ``stuck`` on: through its stuck phase,
its ``Disconnected`` after ``request-timeout`` (10 s) and its failing reconnects), in the same actor:
``<backend>_ratio`` = healthy p99 with the frozen neighbour / healthy p99 without.

    .venv/bin/python bench/isolation.py [--quick] [--only guiserver|soma|wms] [--n N] [--json PATH]

What is frozen, and what a change is, per backend (detection = wall time the change's event
reached a subscriber of the real broker minus the change's wall time):

* guiserver: healthy guiServer emulators in this process; a change is a DiFX status message
  relayed by one of them (``inject``). The neighbour is an emulator process, SIGSTOPped.
* soma: light-mode sessions; a change is a one-job workflow's job ending (the timestamp it
  writes as its last act). The neighbour's database is locked by a process that is then
  SIGSTOPped (``bench``'s own child).
* wms: a reporting ctrl_bps service whose ``ping()``/``report()`` ask a server process first
  (``bench/_isolation_wms.py``); a change is a watched run set SUCCEEDED. The neighbour's
  server is SIGSTOPped.

Every process started is resumed and ended by PID. The last line is

    BENCH isolation guiserver_ratio= soma_ratio= wms_ratio= <backend>_p99_ms= <backend>_p50_ms= <backend>_frozen_p99_ms= <backend>_frozen_p50_ms= ... n=
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

import _isolation_wms as wmsb
from _common import free_port, log, percentile
from flowbus.schemas import BusConfig, Event, StateChanged

_LOCKER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


class Rig:
    """A broker, one actor, a subscriber; ``changes`` latencies timed by :meth:`measure`."""

    def __init__(self, root: Path, backend: str, specs: list[dict[str, Any]]) -> None:
        from flowbus.actors import _backend_actor as ba
        from flowbus.bus import BrokerProcess, Subscriber

        self.broker = BrokerProcess(BusConfig(ipc_dir=str(root / f"bus-{backend}")), None,  # ipc: the embedded default
                                    log_path=str(root / f"broker-{backend}.log"))
        self.broker.start()
        self.loop = asyncio.new_event_loop()
        self.impl = ba.BackendActorImpl(f"bench-{backend}", self.broker.address, specs)
        self.sub = Subscriber(self.broker.address, f"{backend}/", start="live", rcvhwm=1_000_000)
        self.loop.run_until_complete(asyncio.wait_for(self.impl.start(), 180))

    def stuck(self) -> dict[str, float]:
        return dict(self.loop.run_until_complete(self.impl.ping())["stuck"])

    def call(self, session: str, operation: str, *args: Any) -> Any:
        return self.loop.run_until_complete(self.impl.call(session, operation, *args))

    def wait(self, pred: Callable[[Event], bool], timeout: float, what: str) -> float:
        """Wall time when an event matching ``pred`` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.sub.recv_many(0.05):
                if pred(ev):
                    return time.time()
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}")

    def close(self) -> None:
        self.sub.close()
        try:
            self.loop.run_until_complete(asyncio.wait_for(self.impl.stop(), 120))
        finally:
            self.impl._pool.shutdown(wait=True)
            self.loop.close()
            self.broker.stop()


@contextlib.contextmanager
def child(argv: list[str], ready: bytes) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that prints a line starting with ``ready``; resumed and killed by PID at exit."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(ready):
            raise RuntimeError(f"{argv[:3]} did not start (said {line!r})")
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdout, proc.stdin):
            if pipe is not None:
                pipe.close()


def _spec(config: Any, backend: str) -> dict[str, Any]:
    spec = dict(msgspec.to_builtins(config))
    spec["backend"] = backend
    return spec


def _until_stuck(rig: Rig, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in rig.stuck():
            return True
        time.sleep(0.05)
    return False


def _state(source: str, key: str, state: Any = None, native: str = "") -> Callable[[Event], bool]:
    """A StateChanged of ``source``/``key`` (with that state or native state, when given)."""
    def pred(e: Event) -> bool:
        return (isinstance(e, StateChanged) and e.source == source and e.key == key
                and (state is None or e.state is state) and (not native or e.native == native))
    return pred


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1000 * percentile(values, 50), 1), "p99_ms": round(1000 * percentile(values, 99), 1),
            "n": len(values)}


# -- guiServer ---------------------------------------------------------------------------------------


def run_guiserver(root: Path, n: int, changes: int) -> dict[str, Any]:
    from flowbus.schemas import GuiserverSessionConfig
    from flowbus.services.guiserver import messages as gx
    from flowbus.services.guiserver_emulator import GuiserverEmulator

    emus = [GuiserverEmulator(root / f"gs{i}").start() for i in range(n)]
    port = free_port()
    argv = [sys.executable, "-m", "flowbus.services.guiserver_emulator", "--port", str(port),
            "--sandbox", str(root / "gs-victim")]
    (root / "gs-victim").mkdir()
    try:
        with child(argv, b"guiServer emulator on") as victim:
            specs = [_spec(GuiserverSessionConfig(name=f"h{i}", port=e.port), "guiserver") for i, e in enumerate(emus)]
            specs.append(_spec(GuiserverSessionConfig(name="victim", port=port, request_timeout=10), "guiserver"))
            rig = Rig(root, "guiserver", specs)
            try:
                time.sleep(2)  # every server has handled its client's relay-on

                def measure(tag: str) -> list[float]:
                    out = []
                    for i in range(changes):
                        k, key = i % n, f"{tag}{i}"
                        t0 = time.time()
                        emus[k].inject(gx.status_message(key, "Running"))
                        t1 = rig.wait(_state(f"h{k}", key), 20, key)
                        out.append(t1 - t0)
                        time.sleep(0.05)
                    return out

                base = measure("base")
                os.kill(victim.pid, signal.SIGSTOP)
                stuck = _until_stuck(rig, "victim", 15)
                frozen = measure("frozen")
            finally:
                rig.close()
    finally:
        for e in emus:
            e.stop()
    return {"base": _stats(base), "frozen": _stats(frozen), "victim_stuck": stuck}


# -- soma-workflow -------------------------------------------------------------------------------------


def run_soma(root: Path, n: int, changes: int) -> dict[str, Any]:
    from flowbus.schemas import SomaSessionConfig, State

    specs = [_spec(SomaSessionConfig(name=f"h{i}", directory=str(root / f"soma{i}")), "soma") for i in range(n)]
    specs.append(_spec(SomaSessionConfig(name="victim", directory=str(root / "soma-victim"), request_timeout=10),
                       "soma"))
    rig = Rig(root, "soma", specs)
    marks = root / "marks"
    marks.mkdir()
    try:
        def measure(tag: str) -> list[float]:
            out = []
            for i in range(changes):
                k, mark = i % n, marks / f"{tag}{i}"
                wf = rig.call(f"h{k}", "submit_workflow", {"name": f"{tag}{i}", "jobs": [
                    {"name": "a", "command": ["sh", "-c", f"date +%s.%N > {mark}"]}]})
                t1 = rig.wait(_state(f"h{k}", f"{wf}/a", state=State.COMPLETE), 60, f"{tag}{i}")
                out.append(t1 - float(mark.read_text()))
            return out

        base = measure("base")
        with child([sys.executable, "-c", _LOCKER, str(root / "soma-victim" / "soma-workflow.db")], b"locked") as lk:
            os.kill(lk.pid, signal.SIGSTOP)
            stuck = _until_stuck(rig, "victim", 15)
            frozen = measure("frozen")
    finally:
        rig.close()
    return {"base": _stats(base), "frozen": _stats(frozen), "victim_stuck": stuck}


# -- ctrl_bps WMS ----------------------------------------------------------------------------------------


def run_wms(root: Path, n: int, changes: int) -> dict[str, Any]:
    from flowbus.schemas import WmsSessionConfig

    ports = [free_port() for _ in range(n + 1)]
    servers = [wmsb.echo_server(port) for port in ports]
    try:
        specs = [_spec(WmsSessionConfig(name=f"h{i}", service_class=wmsb.service(f"IsoH{i}", ports[i]),
                                        submit_dir=str(root / f"wms{i}"), report_interval=0.2), "wms")
                 for i in range(n)]
        specs.append(_spec(WmsSessionConfig(name="victim", service_class=wmsb.service("IsoVictim", ports[n]),
                                            submit_dir=str(root / "wms-victim"), report_interval=0.2,
                                            request_timeout=10), "wms"))
        rig = Rig(root, "wms", specs)
        try:
            def measure(tag: str) -> list[float]:
                out = []
                for i in range(changes):
                    k, run = i % n, f"{tag}{i}"
                    wmsb.new_run(run)
                    rig.call(f"h{k}", "watch", run)
                    t0 = time.time()
                    wmsb.finish(run)
                    t1 = rig.wait(_state(f"h{k}", run, native="SUCCEEDED"), 20, run)
                    out.append(t1 - t0)
                return out

            base = measure("base")
            os.kill(servers[n].pid, signal.SIGSTOP)
            stuck = _until_stuck(rig, "victim", 15)
            frozen = measure("frozen")
        finally:
            rig.close()
    finally:
        for p in servers:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
    return {"base": _stats(base), "frozen": _stats(frozen), "victim_stuck": stuck}


RUNS: dict[str, Callable[[Path, int, int], dict[str, Any]]] = {
    "guiserver": run_guiserver, "soma": run_soma, "wms": run_wms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("--quick", action="store_true", help="fewer sessions and changes")
    ap.add_argument("--only", choices=sorted(RUNS), action="append")
    ap.add_argument("--n", type=int, default=0, help="healthy sessions per backend (default 8; quick 4)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    n = a.n or (4 if a.quick else 8)
    changes = 20 if a.quick else 60
    results: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="fbiso-"))
    try:
        for backend in a.only or sorted(RUNS):
            sub = root / backend
            sub.mkdir()
            log(f"{backend}: {n} healthy sessions + 1, {changes} changes each phase")
            res = RUNS[backend](sub, n, changes)
            res["ratio"] = (res["frozen"]["p99_ms"] / res["base"]["p99_ms"]) if res["base"]["p99_ms"] else float("nan")
            log(f"{backend}: healthy p50/p99 {res['base']['p50_ms']}/{res['base']['p99_ms']} ms alone, "
                f"{res['frozen']['p50_ms']}/{res['frozen']['p99_ms']} ms with the frozen neighbour "
                f"(p99 ratio {res['ratio']:.2f}); frozen one named stuck: {res['victim_stuck']}")
            results[backend] = res
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))

    def f(x: Any) -> str:
        return "na" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}" if isinstance(x, float) else str(x)

    keys = [f"{b}_ratio={f(results[b]['ratio'])}" for b in sorted(results)]
    keys += [f"{b}_{w}{q}_ms={f(results[b][p][q + '_ms'])}" for b in sorted(results)
             for p, w in (("base", ""), ("frozen", "frozen_")) for q in ("p99", "p50")]
    print(f"BENCH isolation {' '.join(keys)} n={n}", flush=True)


if __name__ == "__main__":
    main()
