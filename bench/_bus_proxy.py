"""bench/bus.py's fair brokered baseline: raw pyzmq through libzmq's C proxy in its own process.

The proxy binds an XSUB (the raw publisher's XPUB connects to it) and an XPUB (the raw
subscribers connect to it) on 127.0.0.1 and runs ``zmq.proxy`` in a thread until the parent says
stop. Subscriptions travel upstream through it, so the raw publisher's readiness probe works
unchanged. No journal, no acks, no sequence checks: the floor of any brokered design here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from _common import Children, cpu_s, wait_for_stop


def proxy_main(conn: Connection) -> None:
    """Bind XSUB + XPUB, forward between them until stopped; reports its CPU seconds."""
    import zmq

    ctx = zmq.Context()
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    for sock in (xsub, xpub):
        sock.sndhwm = 0
        sock.rcvhwm = 0
        sock.linger = 0
    p_in = xsub.bind_to_random_port("tcp://127.0.0.1")
    p_out = xpub.bind_to_random_port("tcp://127.0.0.1")

    def forward() -> None:
        try:
            zmq.proxy(xsub, xpub)
        except zmq.ZMQError:  # the context ends under it at stop
            pass

    thread = threading.Thread(target=forward, name="proxy", daemon=True)
    thread.start()
    c0 = cpu_s()
    conn.send(("bound", (f"tcp://127.0.0.1:{p_in}", f"tcp://127.0.0.1:{p_out}", c0)))
    wait_for_stop(conn, timeout=600)
    ctx.destroy(linger=0)
    thread.join(2)


def run_proxy(n: int, nsubs: int, batch: int, raw_pub: Callable[..., None], raw_sub: Callable[..., None],
              run: Callable[..., dict[str, Any]], timeout: float = 120.0) -> dict[str, Any]:
    """One raw scenario with the publisher and subscribers on either side of the proxy."""

    def setup(kids: Children) -> tuple[Connection, list[Connection]]:
        proxy = kids.spawn(proxy_main, name="proxy")
        upstream, downstream, _ = kids.expect([proxy], "bound", 60)[0]
        pub = kids.spawn(raw_pub, nsubs, n, batch, 0.0, upstream, name="proxy-pub")
        kids.expect([pub], "bound", 60)
        subs = [kids.spawn(raw_sub, i, downstream, n, batch, False, name=f"proxy-sub{i}") for i in range(nsubs)]
        return pub, subs

    return run(f"raw via C proxy {'batched' if batch > 1 else 'unbatched'}", n, nsubs, setup, timeout)
