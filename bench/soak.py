"""Soak: a compressed week in minutes, sampling memory and fds of every flowbus process.

A broker (child process, on-disk journal with a small ``journal-max-bytes``), a QCG session on a
local manager with a short retention (``retain-hours = 0``, ``retain-count``), a subscriber
draining everything, and a rule engine (``flowbus.rules``, in a child process of its own) with a
rule on every finished job. Jobs (``/bin/true``) are submitted in batches as fast as the manager
finishes them. RSS and fds of the session host ("actor": this process), the broker, the rule
engine ("orchestrator") and the QCG manager are sampled every ``--sample`` jobs; after warm-up
(``--warmup`` of the jobs, which also fills the broker's ring) the growth is a least-squares
slope, in MiB per 100k finished jobs. Goal (issue 16): <= 5 MiB per 100k in every process, fds
flat, the journal directory within its limit.

    .venv/bin/python bench/soak.py --jobs 20000

Last line: ``BENCH soak jobs=... actor_mib_per_100k=... broker_mib_per_100k=...
orchestrator_mib_per_100k=... manager_mib_per_100k=... journal_mib=... fds_delta=...``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
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
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--sample", type=int, default=1000, help="jobs between two samples")
    ap.add_argument("--warmup", type=float, default=0.3, help="fraction of the jobs before measuring")
    ap.add_argument("--retain-count", type=int, default=1000)
    ap.add_argument("--journal-events", type=int, default=20_000)
    ap.add_argument("--journal-max-bytes", type=int, default=16 * MIB)
    ap.add_argument("--forgotten-kept", type=int, default=1000, help="the broker's tombstones (bus.forgotten-kept)")
    args = ap.parse_args()

    from flowbus._logging import configure
    from flowbus.bus import BrokerProcess, Publisher, Subscriber
    from flowbus.schemas import BusConfig, Event, QcgSessionConfig, StateChanged
    from flowbus.services.qcg import QcgSession

    configure("warning")
    tmp = Path(tempfile.mkdtemp(prefix="flowbus-soak-"))
    journal = tmp / "journal"
    cfg = BusConfig(transport="tcp", insecure_loopback=True, host="127.0.0.1", request_port=0, publish_port=0,
                    ingest_port=0, command_port=0, journal_events=args.journal_events,
                    journal_max_bytes=args.journal_max_bytes, forgotten_kept=args.forgotten_kept)
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
    poller_stop = threading.Event()

    def poll() -> None:
        while not poller_stop.is_set():
            poller_stop.wait(min(session.poll(), 0.2))

    try:
        if not ready.wait(60):
            raise RuntimeError("the rule engine did not start within 60 s")
        pub.open_source("soak", "qcg")

        def emit(ev: Event) -> None:
            pub.publish(ev)

        session.start(emit, {})
        drainer.start()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        pids = {"actor": os.getpid(), "broker": broker.proc.pid, "orchestrator": rules.pid,
                "manager": session.service_pid}
        procs = {k: psutil.Process(p) for k, p in pids.items() if p}
        samples: list[tuple[int, dict[str, float], int]] = []
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
                log(f"{book.finished:>8} jobs  " + "  ".join(f"{k} {v:6.1f} MiB" for k, v in rss.items())
                    + f"  fds {fds}  journal {_dir_bytes(journal) / MIB:.1f} MiB  retained {len(session.retention)}")
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
        log(f"{args.jobs} jobs in {elapsed:.0f} s ({args.jobs / elapsed:.0f}/s); forgotten "
            f"{session.retention.forgotten}; subscriber saw {finished[0]} final states")
        print("BENCH soak jobs={} actor_mib_per_100k={:.1f} broker_mib_per_100k={:.1f} "
              "orchestrator_mib_per_100k={:.1f} manager_mib_per_100k={:.1f} journal_mib={:.1f} "
              "fds_delta={}".format(args.jobs, slopes.get("actor", 0.0), slopes.get("broker", 0.0),
                                    slopes.get("orchestrator", 0.0), slopes.get("manager", 0.0), journal_mib,
                                    fds_delta))
    finally:
        poller_stop.set()
        session.stop()
        done.set()
        stop.set()
        rules.join(20)
        if rules.is_alive():
            rules.kill()
        sub.close()
        pub.close()
        broker.stop()


if __name__ == "__main__":
    main()
