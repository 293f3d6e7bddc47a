"""bench/bus.py's comparisons with other brokers, run when their servers and clients are
installed: Redis pub/sub (``_redis``), Redis Streams with AOF everysec (``_bus_streams``) and
NATS JetStream with a file store (``_bus_jetstream``). Each records its scenarios through the
bench's ``record``; a comparison that fails is logged and its ratio reported as na/nan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import _redis
from _bus_jetstream import jetstream_available, run_jetstream
from _bus_streams import run_streams, streams_available
from _common import BATCH, BenchError, log


def run_comparisons(_run: Callable[..., dict[str, Any]], record: Callable[[str, dict[str, Any]], None],
                    gate: Callable[[], None], n_unb: int, n_bat: int, n_disk: int) -> None:
    """Redis pub/sub, Redis Streams and JetStream, one event per message and batched."""
    if _redis.redis_available():
        try:
            gate()
            record("redis unbatched 1sub", _redis.run_redis(_run, n_unb, 1, 1))
            gate()
            record("redis batched 1sub", _redis.run_redis(_run, n_bat, 1, BATCH))
        except (BenchError, OSError, ImportError) as exc:  # the comparison is optional
            log(f"  redis comparison failed: {exc} (redis_ratio=na)")
    else:
        log("  redis: redis-server and/or redis-py not installed: skipped (redis_ratio=na)")
    if streams_available():
        try:
            gate()
            record("redis streams unbatched 1sub", run_streams(_run, n_unb, 1))
            gate()
            record("redis streams batched 1sub", run_streams(_run, n_disk, BATCH))
        except (BenchError, OSError, ImportError) as exc:  # the comparison is optional
            log(f"  redis streams comparison failed: {exc} (redis_streams_ratio=nan)")
    else:
        log("  redis streams: redis-server and/or redis-py not installed: skipped (redis_streams_ratio=nan)")
    if jetstream_available():
        try:
            gate()
            record("jetstream unbatched 1sub", run_jetstream(_run, min(n_unb, 30_000), 1))
            gate()
            record("jetstream batched 1sub", run_jetstream(_run, n_disk, BATCH))
        except (BenchError, OSError, ImportError) as exc:  # the comparison is optional
            log(f"  jetstream comparison failed: {exc} (jetstream_ratio=nan)")
    else:
        log("  jetstream: nats-server and/or nats-py not installed: skipped (jetstream_ratio=nan)")


__all__ = ["run_comparisons"]
