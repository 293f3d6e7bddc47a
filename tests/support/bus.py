"""Shared fixtures and helpers for the bus and schema tests.

A test module gets the ``bus`` fixture by importing ``bus_fixture`` from here (pytest registers a
fixture under its declared name, whatever the attribute is called).

``bus`` is a factory (style convention 14): every broker, publisher, subscriber, client and raw
socket it makes is remembered and torn down at the end of the test, each with a timeout; a hung
teardown fails the test with a message naming what leaked. Waits follow convention 10: helpers
block on the thing awaited (``Subscriber.recv``, a reply, a ``threading.Event``) with a deadline,
never on a bare sleep.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq

from flowbus.bus import (
    Broker,
    BrokerProcess,
    Client,
    ClientCurve,
    Publisher,
    Subscriber,
    ensure_grant_key,
    load_grant_key,
)
from flowbus.schemas import BusConfig, Event, LogLine, State, StateChanged

#: seconds one teardown step may take before the test fails naming the leak
TEARDOWN_TIMEOUT = 10.0


def bus_config(**overrides: Any) -> BusConfig:
    """A loopback config on ephemeral ports with fast heartbeats (override any field)."""
    fields: dict[str, Any] = {
        "transport": "tcp",
        "insecure_loopback": True,  # bus mechanics on plain loopback TCP; test_trust covers the default
        "host": "127.0.0.1",
        "request_port": 0,
        "publish_port": 0,
        "ingest_port": 0,
        "command_port": 0,
        "heartbeat_interval": 0.1,
    }
    fields.update(overrides)
    return BusConfig(**fields)


class ThreadBroker:
    """An in-process :class:`Broker` serving from a daemon thread (fast, for unit-level tests).

    ``publish_sndhwm`` is fault injection for slow-subscriber tests: the broker's publish socket
    gets a second listener whose connections have that send high-water mark (options are copied
    into a listener when it binds), and ``info`` sends subscribers there.
    """

    def __init__(self, config: BusConfig, journal_dir: str | None = None,
                 publish_sndhwm: int | None = None) -> None:
        self.broker = Broker(config, journal_dir)
        self.endpoints = self.broker.bind()
        if publish_sndhwm is not None:
            xpub = self.broker.xpub
            xpub.sndhwm = publish_sndhwm
            xpub.sndbuf = 64 * 1024
            xpub.bind(f"tcp://{config.host}:*")
            self.broker.endpoints["publish"] = self.endpoints["publish"] = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flowbus-test-broker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.broker.run()
        except BaseException as exc:  # noqa: BLE001 - reported by stop() and the fixture
            self.failure = exc

    @property
    def address(self) -> str:
        return self.endpoints["request"]

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = TEARDOWN_TIMEOUT) -> None:
        self.broker.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("in-process broker thread did not stop")
        if self.failure is not None:
            raise RuntimeError(f"in-process broker died: {self.failure!r}") from self.failure


class BusFactory:
    """Makes brokers, publishers, subscribers, clients and raw sockets; tears them all down."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        #: the grant key of the brokers made here (sessions' grants: ``make_grant(self.grant_key, ...)``)
        self.grant_key_file = str(ensure_grant_key(tmp_path / "keys" / "grant.key"))
        self.grant_key = load_grant_key(self.grant_key_file)
        self._teardown: list[tuple[str, Callable[[], None]]] = []
        self._ids = itertools.count(1)
        self._ctx: zmq.Context[Any] | None = None

    def _track(self, what: str, close: Callable[[], None]) -> None:
        self._teardown.append((what, close))

    # -- brokers -----------------------------------------------------------------------------------

    def broker(self, config: BusConfig | None = None, *, journal_dir: str | None = None,
               publish_sndhwm: int | None = None, **overrides: Any) -> ThreadBroker:
        """An in-process broker on ephemeral loopback ports, checking source grants with
        :attr:`grant_key_file` (``grant_key_file=""``: a broker without grants)."""
        tb = ThreadBroker(config or bus_config(**{"grant_key_file": self.grant_key_file, **overrides}), journal_dir,
                          publish_sndhwm)
        self._track(f"in-process broker {tb.address}", tb.stop)
        return tb

    def broker_process(self, config: BusConfig | None = None, *, journal: bool = True,
                       **overrides: Any) -> BrokerProcess:
        """A started broker child process with an on-disk journal and a log file (``.log_path``)."""
        n = next(self._ids)
        proc = BrokerProcess(config or bus_config(**{"grant_key_file": self.grant_key_file, **overrides}),
                             journal_dir=str(self.tmp_path / f"journal-{n}") if journal else None,
                             log_path=str(self.tmp_path / f"broker-{n}.log"))
        self._track(f"broker process #{n}", lambda: proc.stop(TEARDOWN_TIMEOUT / 2))
        proc.start()
        return proc

    # -- clients of the bus --------------------------------------------------------------------------

    def publisher(self, address: str, **kwargs: Any) -> Publisher:
        kwargs.setdefault("heartbeat_interval", 0.1)
        kwargs.setdefault("retransmit_after", 0.5)
        pub = Publisher(address, **kwargs)
        self._track(f"publisher to {address}", pub.close)
        return pub

    def source(self, address: str, name: str, backend: str = "qcg", **kwargs: Any) -> Publisher:
        """A publisher with ``name`` already registered."""
        pub = self.publisher(address, **kwargs)
        pub.open_source(name, backend)
        return pub

    def subscriber(self, address: str, prefixes: str | Sequence[str] = "", **kwargs: Any) -> Subscriber:
        sub = Subscriber(address, prefixes, **kwargs)
        self._track(f"subscriber {sub.prefixes!r}", sub.close)
        return sub

    def client(self, address: str, **kwargs: Any) -> Client:
        client = Client(address, **kwargs)
        self._track(f"client of {address}", client.close)
        return client

    def raw(self, kind: int, endpoint: str, *, curve: ClientCurve | None = None,
            subscribe: bytes | None = None) -> zmq.Socket[Any]:
        """A bare ZeroMQ socket connected to ``endpoint`` (for garbage and CURVE probes)."""
        if self._ctx is None:
            self._ctx = zmq.Context()
            ctx = self._ctx
            self._track("raw socket context", lambda: ctx.destroy(linger=0))
        sock = self._ctx.socket(kind)
        sock.linger = 0
        if curve is not None:
            curve.apply(sock)
        if subscribe is not None:
            sock.setsockopt(zmq.SUBSCRIBE, subscribe)
        sock.connect(endpoint)
        self._track(f"raw socket to {endpoint}", lambda: sock.close(0))
        return sock

    # -- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close everything in reverse order of creation; fail naming whatever hung or broke."""
        hung: list[str] = []
        broken: list[str] = []
        while self._teardown:
            what, close = self._teardown.pop()
            errors: list[BaseException] = []

            def run(close: Callable[[], None] = close, errors: list[BaseException] = errors) -> None:
                try:
                    close()
                except BaseException as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(exc)

            t = threading.Thread(target=run, name=f"teardown {what}", daemon=True)
            t.start()
            t.join(TEARDOWN_TIMEOUT)
            if t.is_alive():
                hung.append(what)
            elif errors:
                broken.append(f"{what}: {errors[0]!r}")
        if hung or broken:
            pytest.fail(f"bus teardown: hung {hung}, failed {broken}")


@pytest.fixture(name="bus")
def bus_fixture(tmp_path: Path) -> Iterator[BusFactory]:
    """The factory of brokers, publishers, subscribers and clients for one test."""
    factory = BusFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


# -- events and waiting ------------------------------------------------------------------------------


def state(source: str, key: str, st: State = State.ACTIVE, backend: str = "qcg", **kw: Any) -> StateChanged:
    return StateChanged(source=source, backend=backend, key=key, state=st, **kw)


def logline(source: str, key: str, message: str = "", backend: str = "qcg", **kw: Any) -> LogLine:
    return LogLine(source=source, backend=backend, key=key, message=message, **kw)


def collect(sub: Subscriber, count: int, timeout: float = 10.0,
            keep: Callable[[Event], bool] | None = None) -> list[Event]:
    """Receive until ``count`` kept events arrived or ``timeout`` passed; returns what arrived."""
    out: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ev = sub.recv(left)
        if ev is not None and (keep is None or keep(ev)):
            out.append(ev)
    return out


def seqs_of(events: Sequence[Event], source: str) -> list[int]:
    return [ev.seq for ev in events if ev.source == source]


def dropped_reasons(log_path: str | Path, event: str = "broker.frame.dropped") -> Counter[str]:
    """How many ``event`` log lines a broker wrote per ``reason``."""
    counts: Counter[str] = Counter()
    for line in Path(log_path).read_text().splitlines():
        if event in line:
            m = re.search(r"\breason=(\S+)", line)
            counts[m.group(1) if m else "?"] += 1
    return counts
