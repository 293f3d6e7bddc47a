"""Soak: a compressed week in minutes, sampling memory and fds of every flowbus process.

A broker (child process, on-disk journal with a small ``journal-max-bytes`` in small segments), a
QCG session on a local manager with a short retention (``retain-hours = 0``, ``retain-count``), a
subscriber draining everything, and a rule engine (``flowbus.rules``, in a child process of its
own) with a rule on every finished job. Jobs (``/bin/true``) are submitted in batches as fast as
the manager finishes them. Beside them, in the same process and publishing to the same broker
(``bench/_soak_loads.py``): an ecFlow session on a real ``ecflow_server`` started here (127.0.0.1,
loopback shim) whose suite cycles through a repeat, a soma-workflow session (light mode) and a
WMS/Parsl session, both kept busy with small workflows; every session has a short retention, so
forgetting happens during the run (``--no-others``: QCG only, as before).

RSS and fds of the session host ("actor": this process, where all sessions run), the broker, the
rule engine ("orchestrator"), the QCG manager and the ecflow_server are sampled every
``--sample`` QCG jobs; after warm-up (``--warmup`` of the jobs, which also fills the broker's
ring) the growth is a least-squares slope, in MiB per 100k finished QCG jobs. Goal (issue 16):
<= 5 MiB per 100k in every process, fds flat, the journal directory within its limit
(``journal-max-bytes`` plus the snapshot segment plus one write; 2 MiB allowed for both).

    .venv/bin/python bench/soak.py --jobs 20000
    .venv/bin/python bench/soak.py --quick      # about 3 minutes

Last line: ``BENCH soak jobs=... actor_mib_per_100k=... broker_mib_per_100k=...
orchestrator_mib_per_100k=... manager_mib_per_100k=... journal_mib=... fds_delta=...
ecflow_server_mib_per_100k=... ecflow_cycles=... soma_workflows=... wms_workflows=...
forgotten=... journal_peak_mib=... journal_within_limit=0|1 soma_disk_mib=... wms_disk_mib=...
seconds=... load1=...`` (``forgotten``: ``Forgotten`` events of all sessions; ``*_disk_mib``:
the soma directory and the WMS submit directory at the end; ``load1``: the machine's 1-minute
load average at the end, which the other figures depend on).
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from _common import die_with_parent, log

MIB = 1024 * 1024


def _rules_child(address: str, ready: Any, stop: Any) -> None:
    """The rule engine: one rule on every finished job, counting its firings."""
    die_with_parent()
    from flowbus._logging import configure
    from flowbus.bus import Client
    from flowbus.rules import Rules

    configure("warning")
    fired = [0]
    with Client(address) as client:
        rules = Rules(client, source="soak-rules")
        rules.add("done", when="qcg/soak/state/* final=true", then=lambda _f: fired.__setitem__(0, fired[0] + 1))
        rules.start()
        ready.set()
        stop.wait()
        rules.stop()


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true",
                    help="about 3 minutes on a loaded 2-core machine: --jobs 36000 --sample 1000 --journal-events 5000")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--sample", type=int, default=1000, help="jobs between two samples")
    ap.add_argument("--warmup", type=float, default=0.3, help="fraction of the jobs before measuring")
    ap.add_argument("--retain-count", type=int, default=1000)
    ap.add_argument("--journal-events", type=int, default=20_000)
    ap.add_argument("--journal-max-bytes", type=int, default=16 * MIB)
    ap.add_argument("--journal-segment-bytes", type=int, default=4 * MIB)
    ap.add_argument("--forgotten-kept", type=int, default=1000, help="the broker's tombstones (bus.forgotten-kept)")
    ap.add_argument("--no-others", action="store_true", help="QCG jobs only (no ecFlow, soma, WMS)")
    ap.add_argument("--ecflow-tasks", type=int, default=4, help="tasks per cycle of the ecFlow suite's repeat")
    ap.add_argument("--soma-inflight", type=int, default=2, help="soma workflows under way at a time")
    ap.add_argument("--wms-inflight", type=int, default=1, help="WMS workflows under way at a time")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.sample, args.journal_events = 36_000, 1000, min(args.journal_events, 5000)

    from _soak_loads import EcflowLoad, Load, SomaLoad, WmsLoad, start_all
    from flowbus._logging import configure
    from flowbus.bus import BrokerProcess, Publisher, Subscriber
    from flowbus.schemas import BusConfig, Event, QcgSessionConfig, StateChanged
    from flowbus.services.qcg import QcgSession

    configure("warning")
    tmp = Path(tempfile.mkdtemp(prefix="flowbus-soak-"))
    journal = tmp / "journal"
    cfg = BusConfig(transport="tcp", insecure_loopback=True, host="127.0.0.1", request_port=0, publish_port=0,
                    ingest_port=0, command_port=0, journal_events=args.journal_events,
                    journal_max_bytes=args.journal_max_bytes, journal_segment_bytes=args.journal_segment_bytes,
                    forgotten_kept=args.forgotten_kept)
    broker = BrokerProcess(cfg, journal_dir=str(journal), log_path=str(tmp / "broker.log"))
    broker.start()
    assert broker.proc is not None
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    rules = ctx.Process(target=_rules_child, args=(broker.address, ready, stop), daemon=True)
    rules.start()
    pub = Publisher(broker.address)
    sub = Subscriber(broker.address, "")
    finished = [0]
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            for ev in sub.recv_many(0.2):
                if isinstance(ev, StateChanged) and ev.state.final:
                    finished[0] += 1

    drainer = threading.Thread(target=drain, daemon=True)
    session = QcgSession(QcgSessionConfig(name="soak", wd=str(tmp / "qcg"), nodes="n1:4", reconcile_interval=2.0,
                                          retain_hours=0.0, retain_count=args.retain_count))
    others: list[Load] = [] if args.no_others else [
        EcflowLoad("soak-ecf", args.ecflow_tasks, retain_count=max(1, args.ecflow_tasks // 2)),
        SomaLoad("soak-soma", args.soma_inflight, retain_count=50),
        WmsLoad("soak-wms", args.wms_inflight, retain_count=50)]
    poller_stop = threading.Event()

    def poll() -> None:
        while not poller_stop.is_set():
            poller_stop.wait(min(session.poll(), 0.2))

    try:
        if not ready.wait(60):
            raise RuntimeError("the rule engine did not start within 60 s")
        pub.open_source("soak", "qcg")
        for load in others:
            pub.open_source(load.name, load.backend)

        def emit(ev: Event) -> None:
            pub.publish(ev)

        session.start(emit, {})
        start_all(others, tmp, emit)
        for handler in logging.getLogger().handlers:  # Parsl's INFO lines, once per workflow
            handler.setLevel(logging.WARNING)
        drainer.start()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        pids = {"actor": os.getpid(), "broker": broker.proc.pid, "orchestrator": rules.pid,
                "manager": session.service_pid}
        for load in others:
            pids.update(load.pids())
        procs = {k: psutil.Process(p) for k, p in pids.items() if p}
        samples: list[tuple[int, dict[str, float], int]] = []
        journal_peak = 0
        submitted, t0, next_sample = 0, time.monotonic(), 0
        while submitted < args.jobs:
            book = session._book
            if submitted - book.finished < 2 * args.batch:
                n = min(args.batch, args.jobs - submitted)
                session.call("submit", [{"name": f"j{submitted + i}", "exec": "/bin/true"} for i in range(n)])
                submitted += n
            else:
                time.sleep(0.02)
            if book.finished >= next_sample:
                gc.collect()
                rss = {k: p.memory_info().rss / MIB for k, p in procs.items()}
                fds = sum(p.num_fds() for p in procs.values())
                samples.append((book.finished, rss, fds))
                journal_now = _dir_bytes(journal)
                journal_peak = max(journal_peak, journal_now)
                log(f"{book.finished:>8} jobs  " + "  ".join(f"{k} {v:6.1f} MiB" for k, v in rss.items())
                    + f"  fds {fds}  journal {journal_now / MIB:.1f} MiB  retained {len(session.retention)}"
                    + "".join(f"  {o.backend} {o.progress()}" for o in others))
                next_sample += args.sample
        deadline = time.monotonic() + 120
        while session._book.finished < args.jobs and time.monotonic() < deadline:
            time.sleep(0.1)
        pub.flush(30)
        elapsed = time.monotonic() - t0
        warm = [s for s in samples if s[0] >= args.warmup * args.jobs]
        slopes = {k: _slope([float(s[0]) for s in warm], [s[1][k] for s in warm]) * 100_000 for k in procs}
        fds_delta = warm[-1][2] - warm[0][2] if warm else 0
        journal_mib = _dir_bytes(journal) / MIB
        journal_peak = max(journal_peak, _dir_bytes(journal))
        within = journal_peak <= args.journal_max_bytes + 2 * MIB
        counts = {o.backend: o.progress() for o in others}
        disk = {b: _dir_bytes(tmp / b) / MIB if (tmp / b).exists() else 0.0 for b in ("soma", "wms")}
        forgotten = session.retention.forgotten + sum(o.forgotten for o in others)
        for o in others:
            if o.errors:
                log(f"{o.backend}: {len(o.errors)} errors, first: {o.errors[0]}")
        log(f"{args.jobs} jobs in {elapsed:.0f} s ({args.jobs / elapsed:.0f}/s); forgotten "
            f"{session.retention.forgotten} QCG jobs" + "".join(f", {o.forgotten} {o.backend}" for o in others)
            + f"; subscriber saw {finished[0]} final states")
        print("BENCH soak jobs={} actor_mib_per_100k={:.1f} broker_mib_per_100k={:.1f} "
              "orchestrator_mib_per_100k={:.1f} manager_mib_per_100k={:.1f} journal_mib={:.1f} "
              "fds_delta={} ecflow_server_mib_per_100k={:.1f} ecflow_cycles={} soma_workflows={} wms_workflows={} "
              "forgotten={} journal_peak_mib={:.1f} journal_within_limit={} soma_disk_mib={:.1f} wms_disk_mib={:.1f} "
              "seconds={:.0f} load1={:.1f}".format(
                  args.jobs, slopes.get("actor", 0.0), slopes.get("broker", 0.0), slopes.get("orchestrator", 0.0),
                  slopes.get("manager", 0.0), journal_mib, fds_delta, slopes.get("ecflow_server", 0.0),
                  counts.get("ecflow", 0), counts.get("soma", 0), counts.get("wms", 0), forgotten,
                  journal_peak / MIB, int(within), disk["soma"], disk["wms"], elapsed, os.getloadavg()[0]))
    finally:
        poller_stop.set()
        for load in others:
            load.quiesce(15)
        for load in others:
            try:
                load.stop()
            except Exception as exc:  # noqa: BLE001  (the next loads and the broker still stop)
                log(f"{load.backend} stop: {exc!r}")
        session.stop()
        done.set()
        stop.set()
        rules.join(20)
        if rules.is_alive():
            rules.kill()
        sub.close()
        pub.close()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
