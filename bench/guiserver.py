"""guiServer benchmark: relayed DiFX messages into typed events, and job-event latency, through the
emulator; a raw socket reader of the same packets is the baseline, in the same run.

    /tmp/fbvenv/bin/python bench/guiserver.py [--quick] [--reps N] [--messages N] [--jobs N]
                                              [--via-inject] [--json PATH]

Set-up (loopback only): the :class:`GuiserverEmulator` runs in a child process (multiprocessing
spawn), so the producer never competes with the measured consumer for this process's GIL. The
child pre-builds the datagrams (alternating ``DifxStatusMessage`` with progress MJDs and a weight,
and ``DifxAlertMessage``; the last one a sentinel alert). By default it then writes exactly the
RELAY packets ``emulator.inject()`` would send (id 1 + the datagram), encoded once, in one
``sendall`` to each emulator client with relay on, so the consumers are the limit; with
``--via-inject`` it calls ``inject()`` per datagram, whose own rate (~45k/s: it parses each XML
datagram) then caps the raw reader.

* raw: a plain socket client does the handshake (8 ... 18), sends 13, 19, relay on (1) and
  ALL_MESSAGES (17), proves the settings are applied by relaying its own probe (2) back, then
  only frames packets (``FrameDecoder``) and counts RELAY packets until the sentinel.
* session: a :class:`GuiserverSession` (channelled, relay on) whose ``emit`` callback counts the
  typed events (``StateChanged``/``AttributeChanged``/``LogLine``) until the sentinel's ``LogLine``.
  Settings are proved applied by an ``ls`` round trip.

Throughput (``*_eps``) is relayed messages per wall second, from the feed command to the
sentinel; the order of raw/session alternates per repetition and ratios are medians of
back-to-back pairs. The consumer's CPU per message (this process, ``getrusage``) is reported too
(``*_cpu_us``; ``relay_cpu_ratio`` = raw CPU/msg over session CPU/msg): with ``--via-inject``
the raw reader's wall rate is the producer's (``feed_eps``: the feed's rate into the raw reader), and the CPU numbers show the consumers' real cost.

Job latency: ``start_job(wait=False)`` of the emulator's ``good`` outcome (2 ticks of
``step_delay`` = 10 ms each, the emulator default) to the job's final ``StateChanged`` in ``emit``,
over ``--jobs`` jobs with distinct names, one at a time; the raw baseline sends the same DifxStart
(channelled) and times the terminal id (101) on the sub-stream. Last line::

    BENCH guiserver relay_ratio=<session/raw> session_eps= raw_eps= job_p50_ms= job_p99_ms= [more]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from _common import BenchError, Children, cpu_s, log, median, percentile, table

SENTINEL = "flowbus-bench-end"
JOB_DIR = "/data/exp"
STEP_TIMEOUT = 30.0


# -- the emulator child ------------------------------------------------------------------------------


def emulator_child(conn: Connection, sandbox: str, n_jobs: int) -> None:
    from flowbus.services.guiserver import messages as gx
    from flowbus.services.guiserver.protocol import PacketId, encode
    from flowbus.services.guiserver_emulator import GuiserverEmulator

    emu = GuiserverEmulator(sandbox).start()
    try:
        jobs = emu.real(JOB_DIR)
        jobs.mkdir(parents=True, exist_ok=True)
        for prefix in ("sjob", "rjob"):
            for i in range(n_jobs):
                (jobs / f"{prefix}_{i}.input").write_text("# fake\n")
        conn.send(("ready", emu.port))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            if msg[0] == "inject":
                n, via_inject = int(msg[1]), bool(msg[2])
                grams = []
                for i in range(n - 1):
                    if i % 2 == 0:
                        pct = (i % 100) / 100
                        grams.append(gx.status_message("benchjob", "Running", f"benchjob {i}", vis_mjd=60000.0 + pct,
                                                       start_mjd=60000.0, stop_mjd=60001.0, weights=[0.9]))
                    else:
                        grams.append(gx.alert_message("benchjob", f"alert {i}", severity=3 + (i % 3)))
                grams.append(gx.alert_message("benchjob", SENTINEL, severity=4))
                conn.send(("built", None))
                conn.recv()  # "go"
                t0 = time.perf_counter()
                if via_inject:
                    for g in grams:
                        emu.inject(g)
                else:
                    # exactly the packets inject() relays (RELAY + the datagram, up to its first NUL),
                    # encoded once and written in one sendall to each client with relay on
                    blob = b"".join(encode(PacketId.RELAY, g[:10240].split(b"\x00", 1)[0]) for g in grams)
                    for c in list(emu._clients):
                        if c.relay and c.relay_all and c.alive:
                            with c.lock:
                                c.sock.sendall(blob)
                conn.send(("injected", time.perf_counter() - t0))
    finally:
        emu.stop()


class Emulator:
    """The parent's handle on the emulator child."""

    def __init__(self, kids: Children, sandbox: str, n_jobs: int, via_inject: bool) -> None:
        self.kids, self.via_inject = kids, via_inject
        self.conn = kids.spawn(emulator_child, sandbox, n_jobs, name="guiserver-emulator")
        self.port: int = kids.expect([self.conn], "ready", STEP_TIMEOUT)[0]

    def inject(self, n: int, started: threading.Event | None = None) -> tuple[float, float]:
        """Build ``n`` datagrams in the child, then inject them; returns (t_go, inject seconds)."""
        self.conn.send(("inject", n, self.via_inject))
        self.kids.expect([self.conn], "built", STEP_TIMEOUT)
        t_go = time.perf_counter()
        self.conn.send(("go",))
        secs: float = self.kids.expect([self.conn], "injected", STEP_TIMEOUT + n / 1000)[0]
        return t_go, secs


# -- raw baseline --------------------------------------------------------------------------------------


class RawClient:
    """A plain socket client: handshake, channelled mode, relay on; frames and counts packets."""

    def __init__(self, port: int) -> None:
        from flowbus.services.guiserver.protocol import (
            FrameDecoder,
            PacketId,
            encode,
            encode_int,
        )

        self.P, self.encode, self.encode_int = PacketId, encode, encode_int
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
        self.frames = FrameDecoder(max_length=16 * 1024 * 1024)
        self.pending: list[Any] = []
        self.sock.sendall(encode(PacketId.GUISERVER_VERSION))
        self._until(lambda p: p.id == PacketId.CHANNEL_ALL_DATA)
        probe = b"<difxMessage><header><type>DifxAlertMessage</type></header><body><difxAlert>" \
                b"<alertMessage>probe</alertMessage><severity>4</severity></difxAlert></body></difxMessage>"
        self.sock.sendall(encode(PacketId.DIFX_SETUP_PATH, b"/opt/difx/bin/rungeneric.DIFX-DEVEL")
                          + encode(PacketId.CHANNEL_ALL_DATA_ON) + encode(PacketId.RELAY, encode_int(1))
                          + encode(PacketId.MESSAGE_SELECTION, b"ALL_MESSAGES")
                          + encode(PacketId.RELAY_COMMAND, probe))
        self._until(lambda p: p.id == PacketId.RELAY and b"probe" in p.payload)

    def _until(self, pred: Any) -> Any:
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            while self.pending:
                p = self.pending.pop(0)
                if pred(p):
                    return p
            if time.monotonic() > deadline:
                raise BenchError("raw client: timed out")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("raw client: connection closed")
            self.pending += self.frames.feed(data)

    def count_relays(self, n: int, timeout: float) -> tuple[int, float]:
        """Frame packets until ``n`` RELAY packets (the last one the sentinel); (count, t_end)."""
        relay, got, sentinel = int(self.P.RELAY), 0, SENTINEL.encode()
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        for p in self.pending:
            got += p.id == relay
        self.pending.clear()
        while got < n:
            if time.monotonic() > deadline:
                raise BenchError(f"raw client: {got}/{n} relays after {timeout:g} s")
            data = self.sock.recv(262144)
            if not data:
                raise BenchError("raw client: connection closed")
            for p in self.frames.feed(data):
                if p.id == relay:
                    got += 1
                    if got == n and sentinel not in p.payload:
                        raise BenchError("raw client: the last relay is not the sentinel")
        return got, time.perf_counter()

    def job(self, inp: str, port: int, timeout: float) -> float:
        """DifxStart (channelled) for ``inp``; seconds to the terminal id on its sub-stream."""
        from flowbus.services.guiserver import messages as gx
        from flowbus.services.guiserver.protocol import JOB_TERMINAL, decode_int

        doc = gx.build("DifxStart", [("input", inp), ("force", "0"), ("function", "USNO"), ("port", port)],
                       [("manager", {"node": "localhost"}), ("datastream", {"nodes": "localhost"}),
                        ("process", {"nodes": "localhost", "threads": "1"})])
        buf = bytearray()
        t0 = time.perf_counter()
        self.sock.sendall(self.encode(self.P.COMMAND, doc))
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        while True:
            for p in self.pending:
                if p.id == self.P.CHANNEL_DATA and decode_int(p.payload) == port:
                    buf += p.payload[4:]
            self.pending.clear()
            while len(buf) >= 8:  # sub-packets: id, length, data
                pid, length = decode_int(bytes(buf[:4])), decode_int(bytes(buf[4:8]))
                if len(buf) < 8 + length:
                    break
                del buf[:8 + length]
                if pid in JOB_TERMINAL:
                    if pid != 101:
                        raise BenchError(f"raw job {inp}: ended with id {pid}")
                    return time.perf_counter() - t0
            if time.monotonic() > deadline:
                raise BenchError(f"raw job {inp}: no terminal id within {timeout:g} s")
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("raw client: connection closed during a job")
            self.pending += self.frames.feed(data)

    def close(self) -> None:
        self.sock.close()


# -- flowbus session -----------------------------------------------------------------------------------


class Counter:
    """The session's ``emit``: counts typed events, notes the sentinel and final job states."""

    def __init__(self) -> None:
        from flowbus.schemas import LogLine, StateChanged

        self.LogLine, self.StateChanged = LogLine, StateChanged
        self.cond = threading.Condition()
        self.events = 0
        self.by_type: dict[str, int] = {}
        self.sentinel_at: float | None = None
        self.finals: dict[str, tuple[float, str]] = {}

    def __call__(self, ev: Any) -> None:
        now = time.perf_counter()
        with self.cond:
            self.events += 1
            name = type(ev).__name__
            self.by_type[name] = self.by_type.get(name, 0) + 1
            if isinstance(ev, self.LogLine) and ev.message == SENTINEL:
                self.sentinel_at = now
                self.cond.notify_all()
            elif isinstance(ev, self.StateChanged) and ev.state.final:
                self.finals[ev.key] = (now, ev.state.value)
                self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.events, self.by_type, self.sentinel_at = 0, {}, None

    def wait(self, pred: Any, timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise BenchError(f"session: timed out after {timeout:g} s waiting for {what}")


def make_session(port: int, counter: Counter) -> Any:
    from flowbus.schemas import GuiserverSessionConfig
    from flowbus.services.guiserver import GuiserverSession

    cfg = GuiserverSessionConfig(name="bench", host="127.0.0.1", port=port, allowed_dirs=["/data"],
                                 request_timeout=STEP_TIMEOUT, max_packet=16 * 1024 * 1024)
    session = GuiserverSession(cfg)
    session.start(counter, {})
    session.call("ls", JOB_DIR)  # every setting sent before it has been applied by the server
    return session


# -- scenarios -------------------------------------------------------------------------------------------


def run_raw(emu: Emulator, n: int) -> dict[str, Any]:
    raw = RawClient(emu.port)
    try:
        result: dict[str, Any] = {}

        def consume() -> None:
            c0 = cpu_s()
            result["got"], result["t_end"] = raw.count_relays(n, STEP_TIMEOUT + n / 500)
            result["cpu"] = cpu_s() - c0

        t = threading.Thread(target=consume, daemon=True)
        c_start = cpu_s()
        t.start()
        t_go, inject_s = emu.inject(n)
        t.join(STEP_TIMEOUT + n / 500)
        if "t_end" not in result:
            raise BenchError("raw client: did not finish")
        secs = result["t_end"] - t_go
        return {"eps": n / secs, "secs": secs, "cpu_us": (cpu_s() - c_start) / n * 1e6, "producer_eps": n / inject_s,
                "events": n}
    finally:
        raw.close()


def run_session(emu: Emulator, n: int, counter: Counter) -> dict[str, Any]:
    session = make_session(emu.port, counter)
    try:
        counter.reset()
        c0 = cpu_s()
        t_go, inject_s = emu.inject(n)
        counter.wait(lambda: counter.sentinel_at is not None, STEP_TIMEOUT + n / 500, "the sentinel")
        assert counter.sentinel_at is not None
        secs = counter.sentinel_at - t_go
        cpu = cpu_s() - c0
        return {"eps": n / secs, "secs": secs, "cpu_us": cpu / n * 1e6, "producer_eps": n / inject_s,
                "events": counter.events, "typed_eps": counter.events / secs, "by_type": dict(counter.by_type)}
    finally:
        session.stop()


def run_jobs(emu: Emulator, n_jobs: int, counter: Counter) -> dict[str, Any]:
    session = make_session(emu.port, counter)
    lat: list[float] = []
    try:
        for i in range(n_jobs):
            name = f"sjob_{i}"
            t0 = time.perf_counter()
            assert session.call("start_job", f"{JOB_DIR}/{name}.input") == name
            counter.wait(lambda name=name: name in counter.finals, STEP_TIMEOUT, f"the final state of {name}")
            t_end, state = counter.finals[name]
            if state != "complete":
                raise BenchError(f"session job {name}: {state}")
            lat.append((t_end - t0) * 1000)
    finally:
        session.stop()
    raw = RawClient(emu.port)
    raw_lat: list[float] = []
    try:
        for i in range(n_jobs):
            raw_lat.append(raw.job(f"{JOB_DIR}/rjob_{i}.input", 7000 + i, STEP_TIMEOUT) * 1000)
    finally:
        raw.close()
    return {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "max_ms": max(lat),
            "raw_p50_ms": percentile(raw_lat, 50), "raw_p99_ms": percentile(raw_lat, 99), "jobs": n_jobs}


def _fmt(x: float | None, nd: int = 2) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.{nd}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages and jobs, one repetition (< 20 s)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each relay scenario (median)")
    ap.add_argument("--messages", type=int, default=None, help="relayed messages per scenario")
    ap.add_argument("--jobs", type=int, default=None, help="jobs for the latency run")
    ap.add_argument("--via-inject", action="store_true",
                    help="feed relays through emulator.inject() one by one (then its rate is usually the limit)")
    ap.add_argument("--json", help="also write all results to this file")
    args = ap.parse_args()

    def _sigterm(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)
    n, reps, n_jobs = (10000, 1, 30) if args.quick else (30000, 3, 100)
    n, reps, n_jobs = args.messages or n, args.reps or reps, args.jobs or n_jobs
    if n < 2 or n_jobs < 1 or reps < 1:
        ap.error("--messages >= 2, --jobs >= 1, --reps >= 1")
    t_start = time.monotonic()
    log(f"guiserver bench: {'quick' if args.quick else 'full'}, {n} relayed messages x {reps} reps, {n_jobs} jobs")
    sandbox = tempfile.mkdtemp(prefix="flowbus-bench-guiserver-")
    kids = Children()
    counter = Counter()
    raws: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    try:
        emu = Emulator(kids, sandbox, n_jobs, args.via_inject)
        for rep in range(reps):
            order = ("raw", "session") if rep % 2 == 0 else ("session", "raw")
            for kind in order:
                if kind == "raw":
                    raws.append(run_raw(emu, n))
                    log(f"  rep {rep + 1} raw:     {raws[-1]['eps']:9.0f} msg/s, {raws[-1]['cpu_us']:6.1f} µs CPU/msg, "
                        f"producer {raws[-1]['producer_eps']:.0f} msg/s")
                else:
                    sessions.append(run_session(emu, n, counter))
                    s = sessions[-1]
                    log(f"  rep {rep + 1} session: {s['eps']:9.0f} msg/s, {s['cpu_us']:6.1f} µs CPU/msg, "
                        f"{s['events']} typed events ({s['typed_eps']:.0f}/s), producer {s['producer_eps']:.0f} msg/s")
        jobs = run_jobs(emu, n_jobs, counter)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        kids.close()
        shutil.rmtree(sandbox, ignore_errors=True)

    ratios = [s["eps"] / r["eps"] for r, s in zip(raws, sessions, strict=True)]
    cpu_ratios = [r["cpu_us"] / s["cpu_us"] for r, s in zip(raws, sessions, strict=True)]
    raw_eps, session_eps = median([r["eps"] for r in raws]), median([s["eps"] for s in sessions])
    rows = [["raw reader", f"{raw_eps:.0f}", f"{median([r['cpu_us'] for r in raws]):.1f}", "-",
             f"{median([r['producer_eps'] for r in raws]):.0f}"],
            ["GuiserverSession", f"{session_eps:.0f}", f"{median([s['cpu_us'] for s in sessions]):.1f}",
             f"{median([s['typed_eps'] for s in sessions]):.0f}", f"{median([s['producer_eps'] for s in sessions]):.0f}"]]
    print()
    print(table(rows, ["relay consumer", "msg/s", "µs CPU/msg", "typed ev/s", "feed msg/s (consumer-bound)"]))
    print(f"typed events per {n} messages: {sessions[-1]['by_type']}")
    print(f"jobs ({n_jobs}, 'good'): session p50 {jobs['p50_ms']:.1f} ms, p99 {jobs['p99_ms']:.1f} ms; "
          f"raw p50 {jobs['raw_p50_ms']:.1f} ms, p99 {jobs['raw_p99_ms']:.1f} ms")
    print(f"wall time {time.monotonic() - t_start:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"raw": raws, "session": sessions, "jobs": jobs}, fh, indent=1, default=str)
    fields = [
        ("relay_ratio", _fmt(median(ratios))),
        ("session_eps", _fmt(session_eps, 0)),
        ("raw_eps", _fmt(raw_eps, 0)),
        ("job_p50_ms", _fmt(jobs["p50_ms"], 1)),
        ("job_p99_ms", _fmt(jobs["p99_ms"], 1)),
        ("raw_job_p50_ms", _fmt(jobs["raw_p50_ms"], 1)),
        ("raw_job_p99_ms", _fmt(jobs["raw_p99_ms"], 1)),
        ("relay_cpu_ratio", _fmt(median(cpu_ratios))),
        ("session_typed_eps", _fmt(median([s["typed_eps"] for s in sessions]), 0)),
        ("feed_eps", _fmt(median([r["producer_eps"] for r in raws]), 0)),
        ("messages", str(n)),
        ("feed", "inject" if args.via_inject else "preencoded"),
        ("reps", str(reps)),
        ("jobs", str(n_jobs)),
    ]
    print("BENCH guiserver " + " ".join(f"{k}={v}" for k, v in fields), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
