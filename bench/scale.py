"""Scale benchmark: many real ``ecflow_server`` processes (and a few QCG managers) watched by a
few BackendActors on a private loopback-only Ray, publishing to a real broker process.

    .venv/bin/python bench/scale.py [--quick] [--servers N] [--sessions N] [--actors N] [--json PATH]

Run it in a loopback-only network namespace if you can (``unshare --net``); everything binds
127.0.0.1 anyway (ecflow_server through the LD_PRELOAD shim, Ray through ``actors._ray``).

Phases (each bounded in time; every process is stopped by PID in ``finally``):

1. main: N servers (default 200, small suite each) + ``--qcg`` local QCG managers, sessions
   spread over ``--actors`` BackendActors (16 poll workers each). Detection latency: a label
   on a random server is altered through ``ecflow.Client`` (one change every ~40 ms) and timed
   until the matching ``AttributeChanged`` reaches a bus subscriber in this process. Then CPU
   (idle window) and memory (USS and RSS) of the actor processes, per session.
2. per-server: one actor per server for ``--compare`` servers (default 20): USS and idle CPU per
   actor, i.e. what one actor per server would cost.
3. light: ONE actor hosting ``--sessions`` (default 1,000) real ecFlow sessions spread over the
   running servers (several per server, poll interval ``--light-poll``): opening time, USS
   growth per session (``mib_per_session``), idle CPU, and detection latency (first session).
4. frozen neighbour (``--frozen N`` sessions, default 32; 0 skips it): one actor, one session per
   server; the healthy sessions' detection p99 with one server SIGSTOPped against the same run
   without, with the ecFlow liveness probe (``frozen_ratio``) and without (``frozen_ratio_noprobe``);
   see bench/_scale_frozen.py.

Last line:

    BENCH scale sessions_per_actor= real_servers= p99_ms= mib_per_session= actor_per_server_mib= ...
          servers_max= frozen_ratio= frozen_ratio_noprobe= ...

``servers_max`` is the number of real servers watched at once (the main phase); a 1,000-server
run is ``--servers 1000`` (about 1.5 GiB of servers; give it the whole machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from _common import BenchError, log, median, percentile
from _scale_frozen import run_frozen
from _scale_servers import Fleet, Server, quick_client, suite_text

TASKS = 10


class Arrivals:
    """A subscriber thread recording when each label value first arrives (per source too)."""

    def __init__(self, address: str) -> None:
        from flowbus.bus import Subscriber

        self.first: dict[str, float] = {}
        #: when each source's first Disconnected arrived
        self.lost: dict[str, float] = {}
        self.events = 0
        self._stop = threading.Event()
        self._sub = Subscriber(address, "ecflow/", start="live", rcvhwm=1_000_000)
        self._thread = threading.Thread(target=self._run, name="arrivals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from flowbus.schemas import AttributeChanged, Disconnected

        while not self._stop.is_set():
            for ev in self._sub.recv_many(0.2):
                self.events += 1
                if isinstance(ev, AttributeChanged) and ev.name == "info" and isinstance(ev.value, str):
                    self.first.setdefault(ev.value, time.monotonic())
                elif isinstance(ev, Disconnected):
                    self.lost.setdefault(ev.source, time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close()


def measure_latency(servers: list[Server], arrivals: Arrivals, changes: int, gap: float, tag: str) -> dict[str, Any]:
    """Alter a label on random servers; latency = arrival at the subscriber - time before alter."""
    clients: dict[int, Any] = {}
    sent: dict[str, float] = {}
    last: dict[tuple[int, int], float] = {}
    for k in range(changes):
        # two changes of one label within a poll interval are seen as one (the later value):
        # never touch a label changed less than 2 s ago
        while True:
            s, task = random.choice(servers), random.randrange(TASKS)
            if time.monotonic() - last.get((s.port, task), -10.0) > 2.0:
                break
        c = clients.get(s.port) or clients.setdefault(s.port, quick_client(s.port))
        value = f"{tag}{k}-{random.randrange(1 << 30)}"
        t0 = time.monotonic()
        last[(s.port, task)] = t0
        c.alter(f"/s/f0/t{task}", "change", "label", "info", value)
        sent[value] = t0
        time.sleep(gap * random.uniform(0.5, 1.5))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(v not in arrivals.first for v in sent):
        time.sleep(0.05)
    lat = [1000 * (arrivals.first[v] - t0) for v, t0 in sent.items() if v in arrivals.first]
    missed = len(sent) - len(lat)
    out = {"changes": changes, "missed": missed, "p50_ms": median(lat), "p99_ms": percentile(lat, 99),
           "max_ms": max(lat) if lat else float("nan")}
    log(f"{tag}: {changes} label changes, missed {missed}: p50 {out['p50_ms']:.0f} ms p99 {out['p99_ms']:.0f} ms "
        f"max {out['max_ms']:.0f} ms")
    return out


def proc_mem(pids: list[int]) -> tuple[float, float]:
    """Total USS and RSS (MiB) of the processes."""
    uss = rss = 0.0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        uss += info.uss / 2**20
        rss += info.rss / 2**20
    return uss, rss


def proc_cpu(pids: list[int], window: float) -> float:
    """CPU of the processes over ``window`` s, in % of one core."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass

    def total() -> float:
        t = 0.0
        for p in procs:
            try:
                ct = p.cpu_times()
                t += ct.user + ct.system
            except psutil.Error:
                pass
        return t

    a = total()
    time.sleep(window)
    return 100 * (total() - a) / window


def ecflow_spec(name: str, port: int, poll: float, **more: Any) -> dict[str, Any]:
    import msgspec

    from flowbus.schemas import EcflowSessionConfig

    spec: dict[str, Any] = msgspec.to_builtins(EcflowSessionConfig(name=name, host="127.0.0.1", port=port,
                                                                   poll_interval=poll, **more))
    return spec


def qcg_spec(name: str, wd: Path) -> dict[str, Any]:
    import msgspec

    from flowbus.schemas import QcgSessionConfig

    spec: dict[str, Any] = msgspec.to_builtins(QcgSessionConfig(name=name, wd=str(wd), mode="local"))
    return spec


class Actors:
    """BackendActors we created (stopped, then killed, in ``close``)."""

    def __init__(self, broker: str, namespace: str) -> None:
        self.broker, self.namespace = broker, namespace
        self.handles: list[Any] = []
        self.pids: list[int] = []

    def make(self, name: str, specs: list[dict[str, Any]], workers: int = 16) -> Any:
        from flowbus.actors import BackendActor

        h = BackendActor.options(name=f"scale-{name}", namespace=self.namespace, max_restarts=0,
                                 max_task_retries=0).remote(name, self.broker, specs, None, poll_workers=workers)
        self.handles.append(h)
        return h

    def start_all(self, handles: list[Any], timeout: float) -> list[dict[str, Any]]:
        import ray

        infos = ray.get([h.start.remote() for h in handles], timeout=timeout)
        self.pids += [int(i["pid"]) for i in infos]
        return infos

    def close(self, timeout: float = 120) -> None:
        import ray

        if not self.handles:
            return
        try:
            ray.get([h.stop.remote() for h in self.handles], timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - killed below anyway
            log(f"actors: stop failed ({type(exc).__name__}: {exc}); killing")
        for h in self.handles:
            try:
                ray.kill(h)
            except Exception:  # noqa: BLE001, S110 - gone already, or going: the wait below tells
                pass
        deadline = time.monotonic() + 20
        for pid in self.pids:
            try:
                psutil.Process(pid).wait(max(0.1, deadline - time.monotonic()))
            except psutil.NoSuchProcess:
                pass
            except psutil.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
        self.handles, self.pids = [], []


def run_main(fleet_servers: list[Server], acts: Actors, arrivals: Arrivals, args: argparse.Namespace,
             tmp: Path) -> dict[str, Any]:
    n_act = max(1, args.actors)
    groups: list[list[dict[str, Any]]] = [[] for _ in range(n_act)]
    for i, s in enumerate(fleet_servers):
        groups[i % n_act].append(ecflow_spec(f"e{i}", s.port, args.poll))
    for q in range(args.qcg):
        groups[q % n_act].append(qcg_spec(f"q{q}", tmp / f"qcg{q}"))
    t0 = time.monotonic()
    handles = [acts.make(f"main{a}", g) for a, g in enumerate(groups)]
    infos = acts.start_all(handles, timeout=600)
    sessions = sum(len(i["sessions"]) for i in infos)
    log(f"main: {n_act} actors opened {sessions} sessions ({len(fleet_servers)} ecFlow, {args.qcg} QCG) "
        f"in {time.monotonic() - t0:.1f} s")
    time.sleep(2)
    lat = measure_latency(fleet_servers, arrivals, args.changes, args.gap, "main")
    pids = list(acts.pids)
    cpu = proc_cpu(pids, args.window)
    uss, rss = proc_mem(pids)
    import ray

    pings = ray.get([h.ping.remote() for h in handles], timeout=60)
    stuck = sum(len(p["stuck"]) for p in pings)
    out = {"actors": n_act, "sessions": sessions, "servers": len(fleet_servers), "qcg": args.qcg, **lat,
           "cpu_pct": cpu, "cpu_pct_per_session": cpu / sessions, "uss_mib": uss, "rss_mib": rss,
           "uss_mib_per_session": uss / sessions, "stuck": stuck,
           "late_polls": sum(p["scheduler"].get("late", 0) for p in pings)}
    log(f"main: actors idle {cpu:.1f} % of a core ({cpu / sessions:.3f} %/session), USS {uss:.0f} MiB "
        f"({uss / sessions:.2f} MiB/session incl. the actor processes), RSS {rss:.0f} MiB; stuck {stuck}")
    return out


def run_per_server(servers: list[Server], acts: Actors, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    handles = [acts.make(f"one{i}", [ecflow_spec(f"p{i}", s.port, args.poll)], workers=1)
               for i, s in enumerate(servers)]
    acts.start_all(handles, timeout=600)
    log(f"per-server: {len(handles)} actors (one session each) up in {time.monotonic() - t0:.1f} s")
    time.sleep(2)
    pids = list(acts.pids)
    cpu = proc_cpu(pids, args.window)
    uss, rss = proc_mem(pids)
    k = len(pids)
    out = {"actors": k, "uss_mib_per_actor": uss / k, "rss_mib_per_actor": rss / k, "cpu_pct_per_actor": cpu / k}
    log(f"per-server: {uss / k:.1f} MiB USS ({rss / k:.1f} RSS) and {cpu / k:.2f} % of a core idle per actor")
    return out


def run_light(servers: list[Server], acts: Actors, arrivals: Arrivals, args: argparse.Namespace) -> dict[str, Any]:
    import ray

    n = args.sessions
    specs = [ecflow_spec(f"l{i}", servers[i % len(servers)].port, args.light_poll) for i in range(n)]
    h = acts.make("light", specs, workers=args.workers)
    base = ray.get(h.ping.remote(), timeout=120)  # the actor process exists, no session opened yet
    pid = int(base["pid"])
    acts.pids.append(pid)
    uss0, rss0 = proc_mem([pid])
    t0 = time.monotonic()
    info = ray.get(h.start.remote(), timeout=900)
    dt = time.monotonic() - t0
    opened = len(info["sessions"])
    log(f"light: one actor opened {opened} sessions over {len(servers)} servers in {dt:.1f} s "
        f"({1000 * dt / max(1, opened):.1f} ms/session)")
    time.sleep(3)
    cpu = proc_cpu([pid], args.window)
    uss, rss = proc_mem([pid])
    lat = measure_latency(servers, arrivals, max(20, args.changes // 2), max(args.gap, 0.05), "light")
    ping = ray.get(h.ping.remote(), timeout=60)
    per = (uss - uss0) / max(1, opened)
    out = {"sessions": opened, "open_s": dt, "open_ms_per_session": 1000 * dt / max(1, opened),
           "uss_empty_mib": uss0, "uss_mib": uss, "rss_mib": rss, "rss_empty_mib": rss0, "mib_per_session": per,
           "cpu_pct": cpu, "cpu_pct_per_session": cpu / max(1, opened), "stuck": len(ping["stuck"]),
           "scheduler": ping["scheduler"], **{f"light_{k}": v for k, v in lat.items()}}
    log(f"light: USS {uss0:.0f} -> {uss:.0f} MiB = {per:.3f} MiB/session; idle {cpu:.1f} % of a core "
        f"({cpu / max(1, opened):.4f} %/session); poll interval {args.light_poll} s; scheduler {ping['scheduler']}")
    return out


def frozen_phase(servers: list[Server], acts: Actors, arrivals: Arrivals, a: argparse.Namespace) -> dict[str, Any]:
    """The frozen-neighbour scenario, with the liveness probe and without (bench/_scale_frozen.py)."""
    def measure(healthy: list[Server], changes: int, gap: float, tag: str) -> dict[str, Any]:
        return measure_latency(healthy, arrivals, changes, gap, tag)

    out: dict[str, Any] = {}
    for key, probe in (("probe", True), ("noprobe", False)):
        out[key] = run_frozen(servers, acts.make, arrivals.lost,
                              lambda hs: acts.start_all(hs, timeout=600), acts.close, ecflow_spec, measure,
                              a.frozen, max(40, a.changes // 2), max(a.gap, 0.15), a.poll, probe)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N: a smoke run")
    ap.add_argument("--servers", type=int, default=None, help="real ecflow_servers (default 200, quick 12)")
    ap.add_argument("--sessions", type=int, default=None, help="sessions in the light actor (default 1000, quick 100)")
    ap.add_argument("--actors", type=int, default=None, help="actors in the main phase (default 4, quick 2)")
    ap.add_argument("--compare", type=int, default=None, help="servers with an actor each (default 20, quick 3)")
    ap.add_argument("--qcg", type=int, default=None, help="local QCG managers in the main phase (default 3, quick 1)")
    ap.add_argument("--poll", type=float, default=0.25, help="ecFlow poll interval in the main phase (s)")
    ap.add_argument("--light-poll", type=float, default=1.0, help="ecFlow poll interval of the light sessions (s)")
    ap.add_argument("--workers", type=int, default=16, help="poll workers of the light actor")
    ap.add_argument("--changes", type=int, default=None, help="label changes timed (default 200, quick 30)")
    ap.add_argument("--gap", type=float, default=0.04, help="mean s between two changes")
    ap.add_argument("--window", type=float, default=None, help="idle CPU window, s (default 10, quick 3)")
    ap.add_argument("--frozen", type=int, default=None, help="sessions in the frozen-neighbour actor "
                    "(default 32, quick 8; 0 skips it)")
    ap.add_argument("--skip", default="", help="phases to skip, comma-separated: main,per-server,light")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args()
    q = a.quick
    a.servers = a.servers if a.servers is not None else (12 if q else 200)
    a.sessions = a.sessions if a.sessions is not None else (100 if q else 1000)
    a.actors = a.actors if a.actors is not None else (2 if q else 4)
    a.compare = min(a.servers, a.compare if a.compare is not None else (3 if q else 20))
    a.qcg = a.qcg if a.qcg is not None else (1 if q else 3)
    a.changes = a.changes if a.changes is not None else (30 if q else 200)
    a.window = a.window if a.window is not None else (3.0 if q else 10.0)
    a.frozen = min(a.servers, a.frozen if a.frozen is not None else (8 if q else 32))
    skip = set(filter(None, a.skip.split(",")))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    from flowbus.actors import start_ray, stop_ray
    from flowbus.bus import BrokerProcess
    from flowbus.schemas import BusConfig, RayConfig

    t_start = time.monotonic()
    res: dict[str, Any] = {"args": vars(a)}
    with tempfile.TemporaryDirectory(prefix="fbscale-", dir="/tmp") as tmp_s:
        tmp = Path(tmp_s)
        fleet = Fleet(tmp)
        broker = BrokerProcess(BusConfig(ipc_dir=str(tmp / "bus")), None,  # ipc: the embedded default
                               log_path=str(tmp / "broker.log"))
        acts: Actors | None = None
        arrivals: Arrivals | None = None
        try:
            broker.start()
            servers = fleet.start(a.servers, budget=300, batch=25, suite=suite_text("s", TASKS))
            if not servers:
                raise BenchError("no ecflow_server started")
            start_ray(RayConfig(namespace="flowbus-scale", num_cpus=2))
            acts = Actors(broker.address, "flowbus-scale")
            arrivals = Arrivals(broker.address)
            if "main" not in skip:
                res["main"] = run_main(servers, acts, arrivals, a, tmp)
                acts.close()
            if "per-server" not in skip:
                res["per_server"] = run_per_server(servers[:a.compare], acts, a)
                acts.close()
            if "light" not in skip:
                res["light"] = run_light(servers, acts, arrivals, a)
                acts.close()
            if a.frozen >= 2:
                res["frozen"] = frozen_phase(servers, acts, arrivals, a)
        finally:
            if arrivals is not None:
                arrivals.close()
            if acts is not None:
                acts.close(timeout=60)
            stop_ray()
            fleet.stop()
            broker.stop()
            # QCG managers started under our temporary folder that outlived their actors
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if p.pid != os.getpid() and tmp_s in " ".join(p.info["cmdline"] or []):
                        p.kill()
                except psutil.Error:
                    pass
    nan = float("nan")
    m = res.get("main", {"servers": 0, "p99_ms": nan, "p50_ms": nan, "missed": 0, "actors": 0, "sessions": 0,
                         "uss_mib_per_session": nan, "cpu_pct_per_session": nan})
    per = res.get("per_server", {"uss_mib_per_actor": nan, "cpu_pct_per_actor": nan})
    light = res.get("light", {"sessions": 0, "mib_per_session": nan, "open_ms_per_session": nan,
                              "light_p99_ms": nan, "cpu_pct": nan})
    fr = res.get("frozen", {"probe": {"ratio": nan}, "noprobe": {"ratio": nan}})
    res["elapsed_s"] = time.monotonic() - t_start
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    goals = {"sessions_per_actor>=1000": light["sessions"] >= 1000, "real_servers>=1000": m["servers"] >= 1000,
             "p99<=1000ms": m["p99_ms"] <= 1000, "frozen_ratio<=1.1": fr["probe"]["ratio"] <= 1.1,
             "mib_per_session<=0.2": light["mib_per_session"] <= 0.2}
    log(f"goals: {goals}; {res['elapsed_s']:.0f} s in all")

    def f(x: float, nd: int = 1) -> str:
        return f"{x:.{nd}f}"

    print(f"BENCH scale sessions_per_actor={light['sessions']} real_servers={m['servers']} p99_ms={f(m['p99_ms'], 0)} "
          f"mib_per_session={f(light['mib_per_session'], 3)} actor_per_server_mib={f(per['uss_mib_per_actor'])} "
          f"p50_ms={f(m['p50_ms'], 0)} missed={m['missed']} main_actors={m['actors']} main_sessions={m['sessions']} "
          f"main_mib_per_session={f(m['uss_mib_per_session'], 2)} main_cpu_pct_per_session={f(m['cpu_pct_per_session'], 3)} "
          f"light_open_ms_per_session={f(light['open_ms_per_session'])} light_p99_ms={f(light['light_p99_ms'], 0)} "
          f"light_cpu_pct={f(light['cpu_pct'])} actor_per_server_cpu_pct={f(per['cpu_pct_per_actor'], 2)} "
          f"servers_max={max(m['servers'], fr.get('probe', {}).get('sessions', 0))} frozen_ratio={f(fr['probe']['ratio'], 2)} "
          f"frozen_ratio_noprobe={f(fr['noprobe']['ratio'], 2)} "
          f"frozen_disconnected_s={f(fr['probe'].get('disconnected_s', nan), 2)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
