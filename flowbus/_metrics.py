"""Prometheus metrics of a running ``flowbus up``: what the bus carried and how the broker is.

:class:`BusMetrics` is the bookkeeping (no I/O): ``flowbus up`` feeds it every event its view
receives. :class:`MetricsServer` serves it with the broker's own counters (asked at each scrape)
in Prometheus' text format, through the maintained ``prometheus-client``, on an HTTP port that
answers only a request carrying the owner's token (``Authorization: Bearer <token>``, the token
in ``<state-dir>/metrics.token``, mode 0600): on a shared node every local user reaches
127.0.0.1, and the metrics name every session, rule and job count.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flowbus.schemas import (
    Connected,
    Disconnected,
    Event,
    Freshness,
    RecoveryAttempted,
    RecoveryGaveUp,
    RuleFired,
    SubscriberLagged,
    tag_of,
)

log = structlog.get_logger("flowbus.metrics")

TOKEN_FILE = "metrics.token"  # noqa: S105 - the name of the file, not a secret


class BusMetrics:
    """Counters and gauges from the events of the bus (thread-safe: fed by one thread, read by
    the scraping one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: Counter[tuple[str, str, str]] = Counter()  # (backend, source, type)
        self.rules: Counter[str] = Counter()
        self.recoveries: Counter[tuple[str, str, str, str]] = Counter()  # (backend, source, action, ok)
        self.gave_up: Counter[tuple[str, str]] = Counter()
        self.lagged = 0
        self.sessions: dict[tuple[str, str], str] = {}  # (backend, source) -> up | disconnected
        self._fresh = Freshness()

    def apply(self, ev: Event) -> None:
        with self._lock:
            self.events[(ev.backend, ev.source, tag_of(ev))] += 1
            self._fresh.apply(ev)
            if isinstance(ev, Connected):
                self.sessions[(ev.backend, ev.source)] = "up"
            elif isinstance(ev, Disconnected):
                self.sessions[(ev.backend, ev.source)] = "disconnected"
            elif isinstance(ev, RuleFired):
                self.rules[ev.rule] += 1
            elif isinstance(ev, RecoveryAttempted):
                self.recoveries[(ev.backend, ev.source, ev.action, "true" if ev.ok else "false")] += 1
            elif isinstance(ev, RecoveryGaveUp):
                self.gave_up[(ev.backend, ev.source)] += 1
            elif isinstance(ev, SubscriberLagged):
                self.lagged += ev.lost

    def families(self) -> list[Metric]:
        with self._lock:
            out: list[Metric] = []
            events = CounterMetricFamily("flowbus_events", "Events carried by the bus, per source and type",
                                         labels=["backend", "source", "type"])
            for (backend, source, kind), n in sorted(self.events.items()):
                events.add_metric([backend, source, kind], n)
            out.append(events)
            sessions = GaugeMetricFamily("flowbus_session_up", "1 while a session is connected to its backend",
                                         labels=["backend", "source"])
            stale = GaugeMetricFamily("flowbus_session_stale",
                                      "1 while a session's held states are stale (disconnected, resyncing, "
                                      "publisher lost)", labels=["backend", "source"])
            for (backend, source), state in sorted(self.sessions.items()):
                sessions.add_metric([backend, source], 1.0 if state == "up" else 0.0)
                stale.add_metric([backend, source], 1.0 if self._fresh.staleness(source) else 0.0)
            out += [sessions, stale]
            rules = CounterMetricFamily("flowbus_rule_firings", "Rule firings", labels=["rule"])
            for rule, n in sorted(self.rules.items()):
                rules.add_metric([rule], n)
            out.append(rules)
            rec = CounterMetricFamily("flowbus_recoveries", "Recovery attempts", labels=["backend", "source", "action",
                                                                                         "ok"])
            for key, n in sorted(self.recoveries.items()):
                rec.add_metric(list(key), n)
            out.append(rec)
            gave = CounterMetricFamily("flowbus_recoveries_gave_up", "Sessions that gave up recovering",
                                       labels=["backend", "source"])
            for key2, n in sorted(self.gave_up.items()):
                gave.add_metric(list(key2), n)
            out.append(gave)
            lag = CounterMetricFamily("flowbus_view_lagged_events", "Events the view lost to lag (from the broker)")
            lag.add_metric([], self.lagged)
            out.append(lag)
            return out


class _Collector(Collector):
    def __init__(self, metrics: BusMetrics, broker_stats: Callable[[], dict[str, Any]]) -> None:
        self.metrics, self.broker_stats = metrics, broker_stats

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.families()
        try:
            reply = self.broker_stats()
        except Exception as exc:  # noqa: BLE001 - a scrape reports the broker down, it does not fail
            log.warning("metrics.broker_stats.failed", error=str(exc))
            up = GaugeMetricFamily("flowbus_broker_up", "1 when the broker answered this scrape")
            up.add_metric([], 0.0)
            yield up
            return
        up = GaugeMetricFamily("flowbus_broker_up", "1 when the broker answered this scrape")
        up.add_metric([], 1.0)
        yield up
        counters = CounterMetricFamily("flowbus_broker", "The broker's counters (received, published, replayed, "
                                       "malformed.*, ...)", labels=["counter"])
        for name, value in sorted(dict(reply.get("stats") or {}).items()):
            counters.add_metric([name], float(value))
        yield counters
        for name, what in (("journal_events", "Events held in the broker's journal (memory ring)"),
                           ("sources", "Sources the broker knows")):
            g = GaugeMetricFamily(f"flowbus_broker_{name}", what)
            g.add_metric([], float(reply.get(name) or 0))
            yield g
        subs = GaugeMetricFamily("flowbus_broker_subscriptions", "Topic prefixes subscribed to")
        subs.add_metric([], float(len(reply.get("subscriptions") or ())))
        yield subs
        lost = GaugeMetricFamily("flowbus_broker_publishers_lost", "Publishers the broker counts as lost")
        lost.add_metric([], float(len(reply.get("lost") or ())))
        yield lost


def metrics_token(state: Path) -> str:
    """The owner's scrape token (made on first use, 0600 in the private state dir)."""
    path = state / TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


class MetricsServer:
    """``/metrics`` on ``host:port`` (port 0: a free one), for requests with the token only."""

    def __init__(self, metrics: BusMetrics, broker_stats: Callable[[], dict[str, Any]], state: Path,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(metrics, broker_stats))
        app = make_wsgi_app(registry)
        token = metrics_token(state).encode()

        def guarded(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
            given = str(environ.get("HTTP_AUTHORIZATION", "")).encode()
            if not hmac.compare_digest(given, b"Bearer " + token):
                start("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
                return [b"flowbus metrics: a bearer token is required (the state dir's metrics.token)\n"]
            result: Iterable[bytes] = app(environ, start)
            return result

        self._server: WSGIServer = make_server(host, port, guarded, handler_class=_Quiet)
        self.url = f"http://{host}:{self._server.server_port}/metrics"
        self.token_file = str(state / TOKEN_FILE)
        self._thread = threading.Thread(target=self._server.serve_forever, name="flowbus-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics.serving", url=self.url, token_file=self.token_file)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


__all__ = ["TOKEN_FILE", "BusMetrics", "MetricsServer", "metrics_token"]
