"""bench/scale.py's frozen-neighbour scenario: one actor watches ``n`` real ecflow_servers (one
session each); the detection latency of the healthy sessions is timed with none frozen, then with
one server SIGSTOPped (timed from the freeze on, over ``changes * gap`` seconds), in the same
actor process:
``frozen_ratio`` = p99 with the frozen neighbour / p99 without. The sessions ask ecFlow's NEWS
on their own sockets (GIL-free, ``probe-timeout`` 0.5 s). The same is measured with that off
(``probe-timeout = 0``: the binding's ``news_local``) for comparison (``frozen_ratio_noprobe``):
there every poll of the frozen session holds the actor's GIL for ``request-timeout``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from _common import log
from _scale_servers import Server


def _stuck(handle: Any, name: str, timeout: float) -> bool:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in ray.get(handle.ping.remote(), timeout=60)["stuck"]:
            return True
        time.sleep(0.1)
    return False


def run_frozen(servers: list[Server], make_actor: Callable[[str, list[dict[str, Any]]], Any], lost: dict[str, float],
               start: Callable[[list[Any]], Any], close: Callable[[], None],
               spec: Callable[..., dict[str, Any]], measure: Callable[..., dict[str, Any]],
               n: int, changes: int, gap: float, poll: float, probe: bool) -> dict[str, Any]:
    """One scenario (probe on or off); returns the two latency measurements and their ratio."""
    fleet = servers[:n]
    victim, healthy = fleet[0], fleet[1:]
    tag = "frozen" if probe else "frozen-noprobe"
    specs = [spec(f"{tag}{i}", s.port, poll, probe_timeout=0.5 if probe else 0.0, request_timeout=1)
             for i, s in enumerate(fleet)]
    handle = make_actor(tag, specs)
    start([handle])
    time.sleep(2)
    base = measure(healthy, changes, gap, f"{tag}-base")
    assert victim.proc is not None
    frozen_at = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:  # timed from the freeze on: the stuck phase, the Disconnected one and the first reconnects
        frozen = measure(healthy, changes, gap, f"{tag}-one-frozen")
        seen = _stuck(handle, f"{tag}0", 1.0)
        log(f"{tag}: server {victim.port} SIGSTOPped; its session reported stuck: {seen}")
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    close()
    ratio = frozen["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan")
    # stuck -> Disconnected: stated bound request-timeout + probe-timeout + poll-interval
    gone = lost.get(f"{tag}0")
    disconnected_s = round(gone - frozen_at, 3) if gone is not None and gone >= frozen_at else float("nan")
    log(f"{tag}: the frozen session's Disconnected arrived {disconnected_s} s after SIGSTOP "
        f"(bound with the probe: {1 + 0.5 + poll:g} s)")
    log(f"{tag}: healthy p99 {base['p99_ms']:.0f} ms -> {frozen['p99_ms']:.0f} ms with one of {n} frozen "
        f"(ratio {ratio:.2f}); missed {base['missed']} / {frozen['missed']}")
    return {"sessions": n, "base": base, "frozen": frozen, "ratio": ratio, "reported_stuck": seen,
            "disconnected_s": disconnected_s}
