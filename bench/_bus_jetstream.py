"""bench/bus.py's durable comparison: NATS JetStream (file store) through nats-py.

Only when ``nats-server`` (Debian's) and nats-py (``pip install flowbus[bench]``) are installed.
The server is started with JetStream on 127.0.0.1, its store in a temporary directory, and
stopped by PID. The publisher uses ``publish_async`` (acks awaited at the end); unbatched is one
event per message, batched a msgpack list of 100. The subscriber is an ordered push consumer
created before publishing starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from _common import (
    BATCH,
    IDLE_TIMEOUT,
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

SUBJECT = "flowbus.bench"
STREAM = "FLOWBUS_BENCH"


def js_pub(conn: Connection, port: int, n: int, batch: int) -> None:
    """publish_async ``n`` events, then wait for every ack."""
    import msgspec
    import nats

    make = _event_factory()
    enc = msgspec.msgpack.Encoder().encode

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream(publish_async_max_pending=20_000)
        conn.send(("ready",))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # go
        tns = time.time_ns
        c0 = cpu_s()
        t0 = time.monotonic()
        if batch == 1:
            for i in range(n):
                await js.publish_async(SUBJECT, enc(make(i, i + 1, tns(), 1)))
        else:
            for b in range(0, n, batch):
                t = tns()
                await js.publish_async(SUBJECT, enc([make(i, i + 1, t, 1) for i in range(b, min(n, b + batch))]))
        await js.publish_async_completed()
        t1 = time.monotonic()
        conn.send(("done", {"t0": t0, "t1": t1, "cpu": cpu_s() - c0}))
        await asyncio.get_running_loop().run_in_executor(None, wait_for_stop, conn)
        await nc.close()

    asyncio.run(main())


def js_sub(conn: Connection, port: int, n: int, batch: int) -> None:
    """An ordered push consumer on the stream; counts seqs until it has all ``n``."""
    import nats

    from flowbus.schemas import decode, decode_many

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        sub = await js.subscribe(SUBJECT, ordered_consumer=True, pending_msgs_limit=-1, pending_bytes_limit=-1)
        conn.send(("ready",))
        tally = _Tally(n, False)
        seen = tally.seen
        c0 = cpu_s()
        t_last = time.monotonic()
        timeout = START_TIMEOUT
        distinct = dups = 0
        while distinct < n:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except nats.errors.TimeoutError:
                t_last = time.monotonic() - timeout
                break
            timeout = IDLE_TIMEOUT
            for ev in (decode_many(msg.data) if batch > 1 else (decode(msg.data),)):
                if seen[ev.seq]:
                    dups += 1
                else:
                    seen[ev.seq] = 1
                    distinct += 1
            t_last = time.monotonic()
        tally.distinct, tally.dups = distinct, dups
        conn.send(("done", tally.result(t_last, cpu_s() - c0)))
        await asyncio.get_running_loop().run_in_executor(None, wait_for_stop, conn)
        await nc.close()

    asyncio.run(main())


def jetstream_available() -> bool:
    return shutil.which("nats-server") is not None and importlib.util.find_spec("nats") is not None


def run_jetstream(run: Callable[..., dict[str, Any]], n: int, batch: int, timeout: float = 120.0) -> dict[str, Any]:
    """One JetStream scenario (1 subscriber); ``run`` is bench/bus.py's scenario runner."""
    port, store = free_port(), tempfile.mkdtemp(prefix="fbbench-nats-")
    with server_process(["nats-server", "-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port)], store) as server:
        _make_stream(port, server)

        def setup(kids: Children) -> tuple[Connection, list[Connection]]:
            subs = [kids.spawn(js_sub, port, n, batch, name="js-sub")]
            pub = kids.spawn(js_pub, port, n, batch, name="js-pub")
            return pub, subs

        return run(f"jetstream {'batched' if batch > 1 else 'unbatched'}", n, 1, setup, timeout, broker_pid=server.pid)


def _make_stream(port: int, server: subprocess.Popen[bytes]) -> None:
    """Wait for the server (bounded), then create the file-backed stream."""
    import nats

    async def main() -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, connect_timeout=1)
                break
            except (OSError, nats.errors.NoServersError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise BenchError("nats-server did not start") from None
                await asyncio.sleep(0.02)
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage="file")
        await nc.close()

    asyncio.run(main())


__all__ = ["BATCH", "jetstream_available", "run_jetstream"]
