"""Shared helpers for the benchmarks: child processes with a readiness handshake, CPU and noise
accounting, percentiles, number formatting, and the event workload (flowbus imported lazily)."""

from __future__ import annotations

import array
import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import resource
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, cast

_CTX = mp.get_context("spawn")


class BenchError(RuntimeError):
    """A benchmark step failed or timed out (the message says which)."""


def die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies, so a killed bench leaves no orphans."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def cpu_s() -> float:
    """CPU seconds of this process so far, all threads (libzmq's I/O thread included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _child_main(target: Callable[..., Any], conn: Connection, args: tuple[Any, ...]) -> None:
    die_with_parent()
    try:
        target(conn, *args)
    except BaseException as exc:  # reported to the parent, which fails the run
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


class Children:
    """Child processes (spawn), each with a pipe; everything is joined or killed on ``close()``."""

    def __init__(self) -> None:
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []

    def spawn(self, target: Callable[..., Any], *args: Any, name: str = "") -> Connection:
        parent, child = _CTX.Pipe()
        p = _CTX.Process(target=_child_main, args=(target, child, args), name=name or target.__name__, daemon=True)
        p.start()
        child.close()
        self.procs.append(p)
        self.conns.append(parent)
        return parent

    def expect(self, conns: Sequence[Connection], tag: str, timeout: float) -> list[Any]:
        """Wait for one ``(tag, payload)`` message from each of ``conns``; returns the payloads."""
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        pending = list(conns)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                names = [self.procs[self.conns.index(c)].name for c in pending]
                raise BenchError(f"timed out after {timeout:g} s waiting for {tag!r} from {names}")
            for c in cast("list[Connection]", wait(pending, left)):
                try:
                    msg = c.recv()
                except EOFError:
                    name = self.procs[self.conns.index(c)].name
                    raise BenchError(f"{name} exited while we waited for {tag!r}") from None
                if msg[0] == "error":
                    name = self.procs[self.conns.index(c)].name
                    raise BenchError(f"{name} failed: {msg[1]}")
                if msg[0] != tag:
                    raise BenchError(f"expected {tag!r}, got {msg[0]!r}")
                out[id(c)] = msg[1] if len(msg) > 1 else None
                pending.remove(c)
        return [out[id(c)] for c in conns]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def close(self, timeout: float = 5.0) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, ValueError):
                c.send(("stop",))
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
        for c in self.conns:
            c.close()
        self.procs.clear()
        self.conns.clear()


def wait_for_stop(conn: Connection, timeout: float = 60.0) -> None:
    """In a child: block until the parent says stop (keeps sockets open until data is delivered)."""
    if conn.poll(timeout):
        with contextlib.suppress(EOFError):
            conn.recv()


# -- noise -------------------------------------------------------------------------------------------


def _busy_total() -> tuple[float, float]:
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals) - idle) / hz, sum(vals) / hz


def busy_cores(interval: float = 0.5) -> float:
    """Cores busy machine-wide over ``interval`` seconds."""
    b0, _ = _busy_total()
    time.sleep(interval)
    b1, _ = _busy_total()
    return (b1 - b0) / interval


def wait_quiet(threshold: float = 0.35, max_wait: float = 10.0) -> float:
    """Wait (bounded) until the machine is nearly idle; returns the last busy-cores reading."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = busy_cores(0.3)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


class Noise:
    """Machine-wide busy CPU during a measurement; subtract our own to get the foreign load."""

    def __enter__(self) -> Noise:
        self.t0 = time.monotonic()
        self.b0, _ = _busy_total()
        return self

    def __exit__(self, *exc: object) -> None:
        self.t1 = time.monotonic()
        self.b1, _ = _busy_total()

    def foreign_cores(self, own_cpu_s: float) -> float:
        wall = max(1e-9, self.t1 - self.t0)
        return max(0.0, (self.b1 - self.b0 - own_cpu_s) / wall)


# -- numbers -------------------------------------------------------------------------------------------



def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a comparison server the bench starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(argv: list[str], scratch: str = "") -> Iterator[subprocess.Popen[bytes]]:
    """Run a comparison server (redis-server, nats-server from PATH) for the block; stop it by PID
    (terminate, then kill after 5 s) and remove its scratch directory."""
    import shutil

    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield server
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..100."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return float(s[k])


class Poller:
    """Polls a backend session on its own thread (as the actor's scheduler does), timing each
    poll with ``time.thread_time`` (``cpu``); errors are kept for the caller to report."""

    def __init__(self, session: Any, name: str = "bench-poll") -> None:
        self.session = session
        self.stop = threading.Event()
        self.cpu = 0.0
        self.polls = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        delay = 0.0
        while not self.stop.wait(delay):
            t0 = time.thread_time()
            try:
                delay = self.session.poll()
            except BaseException as exc:  # noqa: BLE001  (reported by the caller)
                self.errors.append(exc)
                delay = 0.5
            self.cpu += time.thread_time() - t0
            self.polls += 1

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def si(x: float) -> str:
    """12345 -> '12.3k', 1234567 -> '1.23M'."""
    if math.isnan(x):
        return "-"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = enumerate(zip(r, widths, strict=True))
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in cells)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def log(msg: str) -> None:
    """Progress lines go to stdout too, so the BENCH line stays the last line in every capture."""
    print(msg, flush=True)


# -- the workload shared by every scenario ------------------------------------------------------

SRC = "bench"
BACKEND = "qcg"
PREFIX = f"{BACKEND}/{SRC}/"
RAW_TOPIC = f"{PREFIX}state/".encode()
READY = b"\x00ready/"
BATCH = 100
N_KEYS = 1000
START_TIMEOUT = 30.0  # s a subscriber waits for the first event
IDLE_TIMEOUT = 3.0  # s without events after which a subscriber gives up (loss)




def _event_factory() -> Callable[..., Any]:
    """``make(i, seq, t)``: a StateChanged like an adapter emits (~230 B encoded), keys cycling."""
    from flowbus.schemas import State, StateChanged

    keys = [f"job-{i:04d}" for i in range(N_KEYS)]
    attrs: dict[str, str | int | float | bool | None] = {"queue": "normal", "nodes": 2, "walltime_s": 3600,
                                                         "user": "flowbus", "exit_code": 0}
    active, queued = State.ACTIVE, State.QUEUED

    def make(i: int, seq: int = 0, t: int = 0, incarnation: int = 0) -> Any:
        return StateChanged(source=SRC, backend=BACKEND, key=keys[i % N_KEYS], seq=seq, incarnation=incarnation,
                            time=t, state=active, native="RUNNING", previous=queued, native_previous="QUEUED",
                            try_no=1, attrs=attrs)

    return make


def _pace(i: int, t0: float, period: float) -> None:
    delay = t0 + i * period - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class _Tally:
    """Per-seq accounting in a subscriber: distinct, duplicates, latencies."""

    def __init__(self, n: int, latency: bool) -> None:
        self.n = n
        self.seen = bytearray(n + 2)
        self.distinct = 0
        self.dups = 0
        self.foreign = 0
        self.lat: array.array[int] | None = array.array("q") if latency else None

    def result(self, t_last: float, cpu: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"t_last": t_last, "distinct": self.distinct, "dups": self.dups, "foreign": self.foreign, "cpu": cpu,
                "lat": list(self.lat) if self.lat is not None else None, **(extra or {})}


