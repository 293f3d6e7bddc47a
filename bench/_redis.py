"""Redis pub/sub for bench/bus.py's comparison (used only when redis-server and redis-py exist)."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from _common import (
    BATCH,
    IDLE_TIMEOUT,
    PREFIX,
    START_TIMEOUT,
    BenchError,
    Children,
    _event_factory,
    _Tally,
    cpu_s,
    free_port,
    server_process,
    wait_for_stop,
)

# -- redis children (only when redis-server and redis-py are installed) ----------------------------


def redis_pub(conn: Connection, port: int, nsubs: int, n: int, batch: int) -> None:
    import msgspec
    import redis

    make = _event_factory()
    enc = msgspec.msgpack.Encoder().encode
    r = redis.Redis(host="127.0.0.1", port=port)
    chan = PREFIX
    deadline = time.monotonic() + 30
    while dict(r.pubsub_numsub(chan)).get(chan.encode(), 0) < nsubs:  # readiness: every SUBSCRIBE is live
        if time.monotonic() > deadline:
            raise BenchError("redis publisher: subscribers not seen within 30 s")
        time.sleep(0.005)
    conn.send(("ready",))
    conn.recv()
    tns = time.time_ns
    c0 = cpu_s()
    t0 = time.monotonic()
    pipe = r.pipeline(transaction=False)
    if batch == 1:  # one event per PUBLISH, 100 PUBLISH commands per round trip
        for b in range(0, n, BATCH):
            for i in range(b, min(n, b + BATCH)):
                pipe.publish(chan, enc(make(i, i + 1, tns(), 1)))
            pipe.execute()
    else:
        for b in range(0, n, batch):
            t = tns()
            r.publish(chan, enc([make(i, i + 1, t, 1) for i in range(b, min(n, b + batch))]))
    t1 = time.monotonic()
    conn.send(("done", {"t0": t0, "t1": t1, "cpu": cpu_s() - c0}))
    wait_for_stop(conn)
    r.close()


def redis_sub(conn: Connection, port: int, n: int, batch: int) -> None:
    import redis

    from flowbus.schemas import decode, decode_many

    r = redis.Redis(host="127.0.0.1", port=port)
    ps = r.pubsub()
    ps.subscribe(PREFIX)
    if ps.get_message(timeout=10) is None:  # the subscribe confirmation
        raise BenchError("redis subscriber: no subscribe confirmation")
    conn.send(("ready",))
    tally = _Tally(n, False)
    seen = tally.seen
    c0 = cpu_s()
    t_last = time.monotonic()
    timeout = START_TIMEOUT
    distinct = dups = 0
    while distinct < n:
        msg = ps.get_message(timeout=timeout)
        if msg is None:
            t_last = time.monotonic() - timeout
            break
        timeout = IDLE_TIMEOUT
        if msg["type"] != "message":
            continue
        body = msg["data"]
        for ev in (decode_many(body) if batch > 1 else (decode(body),)):
            if seen[ev.seq]:
                dups += 1
            else:
                seen[ev.seq] = 1
                distinct += 1
        t_last = time.monotonic()
    tally.distinct, tally.dups = distinct, dups
    conn.send(("done", tally.result(t_last, cpu_s() - c0)))
    wait_for_stop(conn)
    ps.close()
    r.close()



@contextlib.contextmanager
def redis_server(*args: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A redis-server on 127.0.0.1 and a free port, without snapshots, ready (it answers PING);
    stopped by PID afterwards. ``args``: more redis-server options."""
    import redis

    port = free_port()
    scratch = tempfile.mkdtemp(prefix="fbbench-redis-")
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", scratch, "--save", "", *args]
    with server_process(argv, scratch) as server:
        r = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise BenchError("redis-server did not start") from None
                time.sleep(0.01)  # the server starting; it has nothing to wait on
        r.close()
        yield port, server


def redis_available() -> bool:
    return shutil.which("redis-server") is not None and importlib.util.find_spec("redis") is not None


def run_redis(run: Callable[..., dict[str, Any]], n: int, nsubs: int, batch: int,
              timeout: float = 120.0) -> dict[str, Any]:
    """One Redis scenario; ``run`` is bench/bus.py's scenario runner."""
    with redis_server("--appendonly", "no", "--client-output-buffer-limit", "pubsub", "0", "0", "0") as (port, server):

        def setup(kids: Children) -> tuple[Connection, list[Connection]]:
            subs = [kids.spawn(redis_sub, port, n, batch, name=f"redis-sub{i}") for i in range(nsubs)]
            pub = kids.spawn(redis_pub, port, nsubs, n, batch, name="redis-pub")
            return pub, subs

        res = run(f"redis {'batched' if batch > 1 else 'unbatched (pipelined)'}", n, nsubs, setup, timeout,
                   broker_pid=server.pid)
        return res


