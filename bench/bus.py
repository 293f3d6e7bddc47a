"""Bus benchmark: raw pyzmq + the same codec versus flowbus end to end (publisher -> broker with
journal -> subscribers), in one run.

    .venv/bin/python bench/bus.py [--quick] [--reps N] [--no-disk] [--json PATH]

Scenarios, each in fresh processes (multiprocessing spawn) on 127.0.0.1:

* raw: one publisher process (XPUB, HWM 0) encoding ``StateChanged`` structs with the schemas'
  encoder and sending on the fast path (``send(topic, SNDMORE)`` + ``send(payload)``); subscriber
  processes doing ``recv()`` + ``recv()`` + the schemas' typed decoder. Unbatched = one event per
  message; batched = a list of 100 events encoded once per message, decoded as a list. Readiness:
  every subscriber also subscribes a unique probe topic; the XPUB publisher starts once it has
  seen all of them (subscriptions are then live).
* flowbus: a ``BrokerProcess`` (journal in memory), a ``Publisher`` in a child process with
  ``batch_max=1`` (unbatched) or ``batch_max=100`` (batched), ``Subscriber`` processes (the
  constructor returns once the subscription is confirmed by the broker). Default, lossless mode:
  acks, retransmits and journal replay. Throughput is measured per subscriber from the first
  ``publish()`` to the last event received; loss and duplicates are counted per source seq.
* latency: one event per ms for a few seconds, the event's ``time`` field set to ``time.time_ns()``
  just before sending; each subscriber computes ``time.time_ns() - ev.time`` (one-way, same host).
* default: the default publisher (``batch_max=100``, one ``publish()`` per event), against raw
  one event per message (``default_ratio``).
* proxy: raw pyzmq through libzmq's C proxy (``zmq.proxy`` XSUB/XPUB in its own process), the fair
  brokered baseline (``proxy_ratio`` = flowbus batched / proxy batched).
* disk: flowbus batched with the journal in a temporary directory, with the default
  ``journal-fsync = "interval"`` (``disk_ratio``) and with ``"always"`` (``disk_always_ratio``).
* burst: 3x the publisher's window (``max_unacked``) published at once: back-pressure, counted for
  loss (``burst_lost``).
* redis: Redis pub/sub via redis-py, only when ``redis-server`` and ``redis`` are installed.
* redis streams: Redis Streams with AOF everysec (``bench/_bus_streams.py``), when redis-server
  and redis-py are installed: ``redis_streams_ratio`` = flowbus disk batched / Streams 100 per
  entry, ``redis_streams_unbatched_ratio`` = flowbus default publisher / Streams one entry per
  event (pipelined).
* jetstream: NATS JetStream, file store (``bench/_bus_jetstream.py``), when nats-server and nats-py
  are installed: ``jetstream_ratio`` = flowbus disk batched / JetStream 100 per message,
  ``jetstream_unbatched_ratio`` = flowbus ``batch_max=1`` (memory journal) / JetStream
  ``publish_async`` one event per message. Missing servers or clients give ``nan``.

Every number comes from this one run: ratios are flowbus/raw of back-to-back pairs (median over
``--reps``; the order alternates per repetition). CPU µs/event per role come from ``getrusage``
(libzmq I/O threads included; the broker's via psutil); ``foreign`` is the machine's busy CPU not
ours, in cores (the VM is shared: treat runs with foreign > ~0.3 as noisy). The last line is

    BENCH bus batched_ratio= unbatched_ratio= p50_us= p99_us= lost= default_ratio= proxy_ratio=
    disk_ratio= replayed= burst_lost= jetstream_ratio= redis_streams_ratio= [more keys]

with ``p50_us``/``p99_us`` the flowbus one-way latency through the broker, ``lost`` the events
missing at flowbus subscribers (by seq, all runs; must be 0: lossless mode) and ``replayed`` the
events subscribers had replayed from the journal (0 in a clean run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from _bus_compare import run_comparisons
from _bus_proxy import run_proxy
from _common import (
    BACKEND,
    BATCH,
    IDLE_TIMEOUT,
    PREFIX,
    RAW_TOPIC,
    READY,
    SRC,
    START_TIMEOUT,
    BenchError,
    Children,
    Noise,
    _event_factory,
    _pace,
    _Tally,
    cpu_s,
    log,
    median,
    percentile,
    si,
    table,
    wait_for_stop,
    wait_quiet,
)

#: the publisher window (max_unacked) of the burst run, which publishes 3x this many events
BURST_WINDOW = 20_000

# -- raw pyzmq children ---------------------------------------------------------------------------


def raw_pub(conn: Connection, nsubs: int, n: int, batch: int, rate: float, connect: str = "") -> None:
    """XPUB publisher: waits for every subscriber's probe subscription, then sends ``n`` events
    (binds, or connects to ``connect``: the C proxy's upstream side)."""
    import msgspec
    import zmq

    make = _event_factory()
    enc = msgspec.msgpack.Encoder().encode
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.sndhwm = 0
    sock.rcvhwm = 0
    sock.linger = 0
    if connect:
        sock.connect(connect)
        conn.send(("bound", connect))
    else:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        conn.send(("bound", f"tcp://127.0.0.1:{port}"))
    seen: set[bytes] = set()
    deadline = time.monotonic() + 30
    while len(seen) < nsubs:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            raise BenchError(f"raw publisher: {len(seen)}/{nsubs} subscriptions after 30 s")
        msg = sock.recv()
        if msg[:1] == b"\x01" and msg[1:].startswith(READY):
            seen.add(msg)
    conn.send(("ready",))
    conn.recv()  # go
    send = sock.send
    more = zmq.SNDMORE
    topic = RAW_TOPIC
    c0 = cpu_s()
    t0 = time.monotonic()
    if rate:  # paced, one event per message, stamped just before sending
        period = 1.0 / rate
        for i in range(n):
            _pace(i, t0, period)
            send(topic, more)
            send(enc(make(i, i + 1, time.time_ns(), 1)))
    elif batch == 1:
        tns = time.time_ns
        for i in range(n):
            send(topic, more)
            send(enc(make(i, i + 1, tns(), 1)))
    else:
        tns = time.time_ns
        for b in range(0, n, batch):
            t = tns()
            send(topic, more)
            send(enc([make(i, i + 1, t, 1) for i in range(b, min(n, b + batch))]))
    t1 = time.monotonic()
    conn.send(("done", {"t0": t0, "t1": t1, "cpu": cpu_s() - c0}))
    wait_for_stop(conn)  # keep the socket until the subscribers are done
    sock.close(0)
    ctx.term()


def raw_sub(conn: Connection, idx: int, endpoint: str, n: int, batch: int, latency: bool) -> None:
    """SUB: recv() + recv() + typed decode, counting seqs."""
    import zmq

    from flowbus.schemas import decode, decode_many

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.rcvhwm = 0
    sock.linger = 0
    sock.setsockopt(zmq.SUBSCRIBE, PREFIX.encode())
    sock.setsockopt(zmq.SUBSCRIBE, READY + str(idx).encode())
    sock.connect(endpoint)
    conn.send(("ready",))
    tally = _Tally(n, latency)
    seen, lat = tally.seen, tally.lat
    recv = sock.recv
    tns = time.time_ns
    t_last = time.monotonic()
    c0 = cpu_s()
    if sock.poll(int(START_TIMEOUT * 1000)):
        sock.rcvtimeo = int(IDLE_TIMEOUT * 1000)
        distinct = dups = 0
        try:
            while distinct < n:
                recv()
                body = recv()
                for ev in (decode_many(body) if batch > 1 else (decode(body),)):
                    s = ev.seq
                    if lat is not None:
                        lat.append(tns() - ev.time)
                    if seen[s]:
                        dups += 1
                    else:
                        seen[s] = 1
                        distinct += 1
            t_last = time.monotonic()
        except zmq.Again:
            t_last = time.monotonic() - IDLE_TIMEOUT
        tally.distinct, tally.dups = distinct, dups
    conn.send(("done", tally.result(t_last, cpu_s() - c0)))
    wait_for_stop(conn)
    sock.close(0)
    ctx.term()


# -- flowbus children -----------------------------------------------------------------------------


def fb_pub(conn: Connection, address: str, n: int, batch_max: int, rate: float, per_event: bool = False,
           max_unacked: int = 1_000_000) -> None:
    """A flowbus Publisher with one source; publishes ``n`` events, then waits for every ack.
    ``per_event``: one ``publish()`` per event even when ``batch_max`` > 1 (the default publisher)."""
    from flowbus.bus import Publisher

    make = _event_factory()
    pub = Publisher(address, batch_max=batch_max, max_unacked=max_unacked, window=min(20_000, max_unacked))
    try:
        pub.open_source(SRC, BACKEND)
        conn.send(("ready",))
        conn.recv()  # go
        publish = pub.publish
        tns = time.time_ns
        c0 = cpu_s()
        t0 = time.monotonic()
        if rate:
            period = 1.0 / rate
            for i in range(n):
                _pace(i, t0, period)
                publish(make(i, 0, tns()))
        elif batch_max > 1 and not per_event:  # batched: build a list and hand it over at once, as raw batched does
            many = pub.publish_many
            for i0 in range(0, n, batch_max):
                t = tns()
                many([make(i, 0, t) for i in range(i0, min(n, i0 + batch_max))])
        else:
            for i in range(n):
                publish(make(i, 0, tns()))
        t1 = time.monotonic()
        pub.flush(timeout=60)
        t2 = time.monotonic()
        conn.send(("done", {"t0": t0, "t1": t1, "t_acked": t2, "cpu": cpu_s() - c0, "stats": dict(pub.stats)}))
        wait_for_stop(conn)
    finally:
        pub.close()


def fb_sub(conn: Connection, address: str, n: int, latency: bool) -> None:
    """A flowbus Subscriber on the bench source's prefix; counts seqs until it has all ``n``."""
    from flowbus.bus import Subscriber

    sub = Subscriber(address, PREFIX)  # returns once the broker confirmed the subscription
    try:
        conn.send(("ready",))
        tally = _Tally(n, latency)
        seen, lat = tally.seen, tally.lat
        recv_many = sub.recv_many
        tns = time.time_ns
        c0 = cpu_s()
        evs = recv_many(START_TIMEOUT)
        distinct = dups = foreign = 0
        while evs:
            for ev in evs:
                if ev.source == SRC:
                    s = ev.seq
                    if lat is not None:
                        lat.append(tns() - ev.time)
                    if seen[s]:
                        dups += 1
                    else:
                        seen[s] = 1
                        distinct += 1
                else:
                    foreign += 1
            if distinct >= n:
                break
            evs = recv_many(IDLE_TIMEOUT)
        t_last = time.monotonic() if evs else time.monotonic() - IDLE_TIMEOUT
        tally.distinct, tally.dups, tally.foreign = distinct, dups, foreign
        st = sub.statistics()
        extra = {"stats": {k: st.get(k, 0) for k in ("received", "delivered", "replayed", "duplicates", "gaps",
                                                      "dropped", "ticks")}}
        conn.send(("done", tally.result(t_last, cpu_s() - c0, extra)))
        wait_for_stop(conn)
    finally:
        sub.close()


# -- parent: one scenario ---------------------------------------------------------------------------


def _summarise(kind: str, n: int, nsubs: int, pub: dict[str, Any], subs: list[dict[str, Any]], noise: Noise,
               other_cpu: float = 0.0, broker_cpu: float | None = None) -> dict[str, Any]:
    t0 = pub["t0"]
    rates = [s["distinct"] / max(1e-9, s["t_last"] - t0) for s in subs]
    own = pub["cpu"] + sum(s["cpu"] for s in subs) + other_cpu + (broker_cpu or 0.0)
    res: dict[str, Any] = {
        "kind": kind, "n": n, "subs": nsubs,
        "eps": sum(rates) / len(rates),  # mean per subscriber
        "eps_min": min(rates),
        "agg": sum(s["distinct"] for s in subs) / max(1e-9, max(s["t_last"] for s in subs) - t0),
        "pub_eps": n / max(1e-9, pub["t1"] - t0),
        "lost": sum(n - s["distinct"] for s in subs),
        "dups": sum(s["dups"] for s in subs),
        "pub_us": 1e6 * pub["cpu"] / n,
        "sub_us": 1e6 * sum(s["cpu"] for s in subs) / len(subs) / n,
        "broker_us": None if broker_cpu is None else 1e6 * broker_cpu / n,
        "foreign": noise.foreign_cores(own),
    }
    lat = [v for s in subs if s.get("lat") for v in s["lat"]]
    if lat:
        res.update(p50_us=percentile(lat, 50) / 1e3, p99_us=percentile(lat, 99) / 1e3,
                   p999_us=percentile(lat, 99.9) / 1e3, max_us=max(lat) / 1e3, samples=len(lat))
    if "t_acked" in pub:
        res["acked_s"] = pub["t_acked"] - t0
    fb_stats = [s["stats"] for s in subs if "stats" in s]
    if fb_stats:
        res["sub_stats"] = {k: sum(st.get(k, 0) for st in fb_stats) for k in fb_stats[0]}
    if "stats" in pub:
        res["pub_stats"] = pub["stats"]
    return res


def _run(kind: str, n: int, nsubs: int, setup: Callable[[Children], tuple[Connection, list[Connection]]],
         timeout: float, broker_pid: int | None = None) -> dict[str, Any]:
    import psutil

    kids = Children()
    try:
        pub, subs = setup(kids)
        kids.expect(subs, "ready", 60)
        kids.expect([pub], "ready", 60)
        bproc = psutil.Process(broker_pid) if broker_pid else None
        b0 = sum(bproc.cpu_times()[:2]) if bproc else 0.0
        p0 = cpu_s()
        with Noise() as noise:
            pub.send(("go",))
            pres = kids.expect([pub], "done", timeout)[0]
            sres = kids.expect(subs, "done", timeout)
        broker_cpu = sum(bproc.cpu_times()[:2]) - b0 if bproc else None
        return _summarise(kind, n, nsubs, pres, sres, noise, other_cpu=cpu_s() - p0, broker_cpu=broker_cpu)
    finally:
        kids.close()


def run_raw(n: int, nsubs: int, batch: int, rate: float = 0.0, timeout: float = 120.0) -> dict[str, Any]:
    def setup(kids: Children) -> tuple[Connection, list[Connection]]:
        pub = kids.spawn(raw_pub, nsubs, n, batch, rate, name="raw-pub")
        endpoint = kids.expect([pub], "bound", 60)[0]
        subs = [kids.spawn(raw_sub, i, endpoint, n, batch, bool(rate), name=f"raw-sub{i}") for i in range(nsubs)]
        return pub, subs

    kind = "raw latency" if rate else f"raw {'batched' if batch > 1 else 'unbatched'}"
    return _run(kind, n, nsubs, setup, timeout)


def run_fb(n: int, nsubs: int, batch_max: int, rate: float = 0.0, journal_dir: str | None = None,
           timeout: float = 120.0, logdir: str | None = None, per_event: bool = False,
           max_unacked: int = 1_000_000, fsync: str = "interval") -> dict[str, Any]:
    # the embedded default's transport: ipc sockets in a private directory (the kernel is the
    # authentication), with source grants on
    from flowbus.bus import BrokerProcess, ensure_grant_key
    from flowbus.schemas import BusConfig

    ipc_dir = tempfile.mkdtemp(prefix="fbbench-ipc-")
    cfg = BusConfig(ipc_dir=os.path.join(ipc_dir, "bus"), journal_fsync=fsync,  # type: ignore[arg-type]
                    grant_key_file=str(ensure_grant_key(os.path.join(ipc_dir, "grant.key"))))
    log_path = os.path.join(logdir, "broker.log") if logdir else None
    bp = BrokerProcess(cfg, journal_dir=journal_dir, log_path=log_path)
    try:
        bp.start()
        address = bp.address

        def setup(kids: Children) -> tuple[Connection, list[Connection]]:
            subs = [kids.spawn(fb_sub, address, n, bool(rate), name=f"fb-sub{i}") for i in range(nsubs)]
            pub = kids.spawn(fb_pub, address, n, batch_max, rate, per_event, max_unacked, name="fb-pub")
            return pub, subs

        mode = "default" if per_event and batch_max > 1 else "batched" if batch_max > 1 else "unbatched"
        kind = "flowbus latency" if rate else f"flowbus {mode}"
        if journal_dir:
            kind += f" (disk journal, fsync {fsync})"
        assert bp.proc is not None
        return _run(kind, n, nsubs, setup, timeout, broker_pid=bp.proc.pid)
    finally:
        bp.stop()
        shutil.rmtree(ipc_dir, ignore_errors=True)


# -- main ---------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def _fmt(x: float | None, nd: int = 2, *, nan: bool = False) -> str:
    return ("nan" if nan else "na") if x is None else f"{x:.{nd}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, one repetition (< 40 s)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each throughput scenario (median)")
    ap.add_argument("--no-disk", action="store_true", help="skip the on-disk journal run")
    ap.add_argument("--json", help="also write all results to this file")
    args = ap.parse_args()

    def _sigterm(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)

    if args.quick:
        n_unb, n_bat, lat_s, n_disk, reps = 50_000, 200_000, 1.0, 100_000, 1
    else:
        n_unb, n_bat, lat_s, n_disk, reps = 200_000, 1_000_000, 2.5, 300_000, 2
    reps = args.reps or reps
    rate = 1000.0
    n_lat = int(lat_s * rate)
    t_start = time.monotonic()
    quiet = wait_quiet(max_wait=5.0)
    log(f"bus bench: {'quick' if args.quick else 'full'}, reps={reps}, unbatched n={n_unb}, batched n={n_bat}, "
        f"latency {n_lat} events at {rate:g}/s; machine busy before start: {quiet:.2f} cores")

    results: dict[str, list[dict[str, Any]]] = {}
    busy = quiet
    logdir = tempfile.mkdtemp(prefix="fbbench-")

    def record(key: str, res: dict[str, Any]) -> None:
        res["busy_before"] = busy
        results.setdefault(key, []).append(res)
        extra = ""
        if "sub_stats" in res:
            st = res["sub_stats"]
            extra = (f" gaps={st.get('gaps', 0)} replayed={st.get('replayed', 0)} frames={st.get('received', 0)}"
                     f" resent={res.get('pub_stats', {}).get('resent', 0)}")
        log(f"  {key:<24} {si(res['eps']):>7} ev/s/sub (min {si(res['eps_min'])}, agg {si(res['agg'])}, "
            f"publish {si(res['pub_eps'])}/s) lost={res['lost']} dups={res['dups']}{extra} "
            f"foreign={res['foreign']:.2f} busy_before={busy:.2f}")

    gate_budget = [10.0 if args.quick else 25.0]

    def gate() -> None:
        """Wait (bounded, in total too) for a quiet machine; a busy one is reported, not waited out."""
        nonlocal busy
        t = time.monotonic()
        busy = wait_quiet(max_wait=min(1.0 if args.quick else 2.0, max(0.0, gate_budget[0])))
        gate_budget[0] -= time.monotonic() - t

    try:
        for rep in range(reps):
            for mode, nsubs in (("unbatched", 1), ("batched", 1), ("unbatched", 4), ("batched", 4)):
                n = n_unb if mode == "unbatched" else n_bat
                b = 1 if mode == "unbatched" else BATCH
                order = ("raw", "fb") if rep % 2 == 0 else ("fb", "raw")  # alternate, so drift hits both
                for who in order:
                    gate()
                    if who == "raw":
                        record(f"raw {mode} {nsubs}sub", run_raw(n, nsubs, b))
                    else:
                        record(f"fb {mode} {nsubs}sub", run_fb(n, nsubs, b, logdir=logdir))
            # the default publisher (batch_max=100, one publish() per event) against raw one event
            # per message, and raw through libzmq's C proxy (the fair brokered baseline)
            gate()
            record("fb default 1sub", run_fb(n_unb, 1, BATCH, logdir=logdir, per_event=True))
            for b, n in ((1, n_unb), (BATCH, n_bat)):
                gate()
                record(f"proxy {'batched' if b > 1 else 'unbatched'} 1sub", run_proxy(n, 1, b, raw_pub, raw_sub, _run))
        gate()
        record("raw latency", run_raw(n_lat, 1, 1, rate=rate))
        gate()
        record("fb latency", run_fb(n_lat, 1, BATCH, rate=rate, logdir=logdir))
        if not args.no_disk:
            jdir = tempfile.mkdtemp(prefix="fbbench-journal-")
            try:
                gate()
                record("fb batched 1sub disk", run_fb(n_disk, 1, BATCH, journal_dir=jdir, logdir=logdir))
            finally:
                shutil.rmtree(jdir, ignore_errors=True)
            jdir = tempfile.mkdtemp(prefix="fbbench-journal-")
            try:
                gate()
                record("fb batched 1sub disk always", run_fb(n_disk, 1, BATCH, journal_dir=jdir, logdir=logdir,
                                                             fsync="always"))
            finally:
                shutil.rmtree(jdir, ignore_errors=True)
        # a burst of 3x the publisher's window (max_unacked): back-pressure, nothing lost
        gate()
        record("fb burst 1sub", run_fb(3 * BURST_WINDOW, 1, BATCH, logdir=logdir, max_unacked=BURST_WINDOW))
        run_comparisons(_run, record, gate, n_unb, n_bat, n_disk)
    except BenchError as exc:
        log(f"bench failed: {exc}")
        blog = os.path.join(logdir, "broker.log")
        if os.path.exists(blog):
            with open(blog) as fh:
                log("broker log tail:\n" + "".join(fh.readlines()[-20:]))
        return 1
    finally:
        shutil.rmtree(logdir, ignore_errors=True)

    # -- report ----------------------------------------------------------------------------------------
    def med(key: str, field: str) -> float | None:
        vals = [r[field] for r in results.get(key, []) if r.get(field) is not None]
        return median(vals) if vals else None

    rows = []
    for key, runs in results.items():
        r0 = runs[0]
        lat = f"{r0['p50_us']:.0f}/{r0['p99_us']:.0f}/{r0['p999_us']:.0f}" if "p50_us" in r0 else "-"
        eps_all = "/".join(si(r["eps"]) for r in runs)
        broker = med(key, "broker_us")
        rows.append([key, si(r0["n"]), si(med(key, "eps") or 0), eps_all, si(med(key, "agg") or 0),
                     si(med(key, "pub_eps") or 0), f"{med(key, 'pub_us'):.2f}", f"{med(key, 'sub_us'):.2f}",
                     "-" if broker is None else f"{broker:.2f}", lat, str(sum(r["lost"] for r in runs)),
                     str(sum(r["dups"] for r in runs)), f"{max(r['foreign'] for r in runs):.2f}"])
    print()
    print(table(rows, ["scenario", "events", "ev/s/sub", "each rep", "aggregate", "publish/s", "pub µs/ev",
                       "sub µs/ev", "broker µs/ev", "lat p50/p99/p99.9 µs", "lost", "dups", "foreign"]))

    raw_b, fb_b = med("raw batched 1sub", "eps"), med("fb batched 1sub", "eps")
    raw_u, fb_u = med("raw unbatched 1sub", "eps"), med("fb unbatched 1sub", "eps")
    fb_lat = results["fb latency"][0]
    raw_lat = results["raw latency"][0]
    lost = sum(r["lost"] for key, runs in results.items() if key.startswith("fb") for r in runs)
    replayed = sum(r.get("sub_stats", {}).get("replayed", 0) for key, runs in results.items() if key.startswith("fb")
                   for r in runs)
    burst_lost = sum(r["lost"] for r in results.get("fb burst 1sub", []))
    dups = sum(r["dups"] for key, runs in results.items() if key.startswith("fb") for r in runs)
    raw_lost = sum(r["lost"] for key, runs in results.items() if key.startswith("raw") for r in runs)
    resent = sum(r.get("pub_stats", {}).get("resent", 0) for runs in results.values() for r in runs)
    foreign_max = max(r["foreign"] for runs in results.values() for r in runs)
    redis_ratio = _ratio(fb_u, med("redis unbatched 1sub", "eps"))
    disk = med("fb batched 1sub disk", "eps")

    def paired(fb_key: str, raw_key: str) -> float | None:
        """Median over repetitions of flowbus/raw, each pair measured back to back."""
        fbs, raws = results.get(fb_key, []), results.get(raw_key, [])
        pairs = [_ratio(f["eps"], r["eps"]) for f, r in zip(fbs, raws, strict=False)]
        vals = [p for p in pairs if p is not None]
        return median(vals) if vals else None

    batched_ratio = paired("fb batched 1sub", "raw batched 1sub")
    unbatched_ratio = paired("fb unbatched 1sub", "raw unbatched 1sub")
    default_ratio = _ratio(med("fb default 1sub", "eps"), raw_u)
    proxy_ratio = _ratio(fb_b, med("proxy batched 1sub", "eps"))
    disk_ratio = _ratio(disk, raw_b)
    goals = {
        "batched >= 0.8 x raw": batched_ratio is not None and batched_ratio >= 0.8,
        "default >= 0.8 x raw unbatched": default_ratio is not None and default_ratio >= 0.8,
        "unbatched >= 0.6 x raw": unbatched_ratio is not None and unbatched_ratio >= 0.6,
        "disk batched >= 0.7 x raw": disk_ratio is not None and disk_ratio >= 0.7,
        "replayed = 0": replayed == 0,
        "p50 <= 200 µs": fb_lat["p50_us"] <= 200,
        "p99 <= 1 ms": fb_lat["p99_us"] <= 1000,
        "zero loss": lost == 0,
    }
    print()
    print("goals: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items()))
    print(f"wall time {time.monotonic() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "goals": goals}, fh, indent=1, default=str)

    fields = [
        ("batched_ratio", _fmt(batched_ratio)),
        ("unbatched_ratio", _fmt(unbatched_ratio)),
        ("p50_us", f"{fb_lat['p50_us']:.0f}"),
        ("p99_us", f"{fb_lat['p99_us']:.0f}"),
        ("lost", str(lost)),
        ("default_ratio", _fmt(default_ratio)),
        ("proxy_ratio", _fmt(proxy_ratio)),
        ("disk_ratio", _fmt(disk_ratio)),
        ("replayed", str(replayed)),
        ("burst_lost", str(burst_lost)),
        ("jetstream_ratio", _fmt(_ratio(disk, med("jetstream batched 1sub", "eps")), nan=True)),
        ("jetstream_unbatched_ratio", _fmt(_ratio(fb_u, med("jetstream unbatched 1sub", "eps")), nan=True)),
        ("redis_streams_ratio", _fmt(_ratio(disk, med("redis streams batched 1sub", "eps")), nan=True)),
        ("redis_streams_unbatched_ratio", _fmt(_ratio(med("fb default 1sub", "eps"),
                                                      med("redis streams unbatched 1sub", "eps")), nan=True)),
        ("disk_always_ratio", _fmt(_ratio(med("fb batched 1sub disk always", "eps"), raw_b))),
        ("proxy_unbatched_ratio", _fmt(_ratio(med("proxy unbatched 1sub", "eps"), raw_u))),
        ("redis_ratio", _fmt(redis_ratio)),
        ("subs4_batched_ratio", _fmt(paired("fb batched 4sub", "raw batched 4sub"))),
        ("subs4_unbatched_ratio", _fmt(paired("fb unbatched 4sub", "raw unbatched 4sub"))),
        ("raw_batched_eps", _fmt(raw_b, 0)),
        ("fb_batched_eps", _fmt(fb_b, 0)),
        ("raw_unbatched_eps", _fmt(raw_u, 0)),
        ("fb_unbatched_eps", _fmt(fb_u, 0)),
        ("raw_batched4_eps", _fmt(med("raw batched 4sub", "eps"), 0)),
        ("fb_batched4_eps", _fmt(med("fb batched 4sub", "eps"), 0)),
        ("raw_unbatched4_eps", _fmt(med("raw unbatched 4sub", "eps"), 0)),
        ("fb_unbatched4_eps", _fmt(med("fb unbatched 4sub", "eps"), 0)),
        ("fb_disk_batched_eps", _fmt(disk, 0)),
        ("raw_p50_us", f"{raw_lat['p50_us']:.0f}"),
        ("raw_p99_us", f"{raw_lat['p99_us']:.0f}"),
        ("dups", str(dups)),
        ("raw_lost", str(raw_lost)),
        ("resent", str(resent)),
        ("foreign_max", f"{foreign_max:.2f}"),
    ]
    print("BENCH bus " + " ".join(f"{k}={v}" for k, v in fields), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
