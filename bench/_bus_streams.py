"""bench/bus.py's durable comparison: Redis Streams (``XADD``/``XREAD``) with AOF ``everysec``.

Only when ``redis-server`` (Debian's) and redis-py (``pip install flowbus[bench]``) are
installed. The server is started on 127.0.0.1 with an append-only file in a temporary directory
(it survives a process crash, as flowbus's disk journal with ``journal-fsync = "interval"`` does)
and stopped by PID. Unbatched: one entry per event, ``XADD`` pipelined 100 per round trip;
batched: one entry carries a msgpack list of 100 events. The subscriber reads with ``XREAD
BLOCK`` from the start of the stream (nothing can be missed: the stream is durable).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from _common import (
    BATCH,
    IDLE_TIMEOUT,
    START_TIMEOUT,
    Children,
    _event_factory,
    _Tally,
    cpu_s,
    wait_for_stop,
)
from _redis import redis_available, redis_server

STREAM = "flowbus-bench"


def streams_pub(conn: Connection, port: int, n: int, batch: int) -> None:
    """XADD ``n`` events (pipelined 100 per round trip, or 100 per entry)."""
    import msgspec
    import redis

    make = _event_factory()
    enc = msgspec.msgpack.Encoder().encode
    r = redis.Redis(host="127.0.0.1", port=port)
    conn.send(("ready",))
    conn.recv()  # go
    tns = time.time_ns
    c0 = cpu_s()
    t0 = time.monotonic()
    pipe = r.pipeline(transaction=False)
    for b in range(0, n, BATCH):
        if batch == 1:
            for i in range(b, min(n, b + BATCH)):
                pipe.xadd(STREAM, {"e": enc(make(i, i + 1, tns(), 1))})
            pipe.execute()
        else:
            t = tns()
            r.xadd(STREAM, {"b": enc([make(i, i + 1, t, 1) for i in range(b, min(n, b + batch))])})
    t1 = time.monotonic()
    conn.send(("done", {"t0": t0, "t1": t1, "cpu": cpu_s() - c0}))
    wait_for_stop(conn)
    r.close()


def streams_sub(conn: Connection, port: int, n: int) -> None:
    """XREAD BLOCK from the stream's start until ``n`` distinct events arrived."""
    import redis

    from flowbus.schemas import decode, decode_many

    r = redis.Redis(host="127.0.0.1", port=port)
    r.ping()
    conn.send(("ready",))
    tally = _Tally(n, False)
    seen = tally.seen
    c0 = cpu_s()
    last_id = "0-0"
    t_last = time.monotonic()
    block_ms = int(START_TIMEOUT * 1000)
    distinct = dups = 0
    while distinct < n:
        reply: Any = r.xread({STREAM: last_id}, count=1000, block=block_ms)
        if not reply:
            t_last = time.monotonic() - block_ms / 1000
            break
        block_ms = int(IDLE_TIMEOUT * 1000)
        entries: list[tuple[Any, dict[bytes, bytes]]] = reply[0][1]
        for entry_id, fields in entries:
            last_id = entry_id
            body = fields.get(b"b")
            events = decode_many(body) if body is not None else (decode(fields[b"e"]),)
            for ev in events:
                if seen[ev.seq]:
                    dups += 1
                else:
                    seen[ev.seq] = 1
                    distinct += 1
        t_last = time.monotonic()
    tally.distinct, tally.dups = distinct, dups
    conn.send(("done", tally.result(t_last, cpu_s() - c0)))
    wait_for_stop(conn)
    r.close()


def streams_available() -> bool:
    return redis_available()


def run_streams(run: Callable[..., dict[str, Any]], n: int, batch: int, timeout: float = 120.0) -> dict[str, Any]:
    """One Redis Streams scenario (1 subscriber); ``run`` is bench/bus.py's scenario runner."""
    with redis_server("--appendonly", "yes", "--appendfsync", "everysec") as (port, server):

        def setup(kids: Children) -> tuple[Connection, list[Connection]]:
            subs = [kids.spawn(streams_sub, port, n, name="streams-sub")]
            pub = kids.spawn(streams_pub, port, n, batch, name="streams-pub")
            return pub, subs

        return run(f"redis streams {'batched' if batch > 1 else 'unbatched (pipelined)'}", n, 1, setup, timeout,
                   broker_pid=server.pid)
