"""The real-time monitor as operations of :data:`._ops.OPS` (START_DIFX_MONITOR,
docs/protocols/guiserver.md §5.9; wire format in :mod:`.monitor`).

What a DiFX user gets, as in the DiFX GUI's real-time monitor: ``monitor_start`` names a job's
``.input`` and returns its correlation products (baselines and autocorrelations per frequency and
polarisation product, with the scans); ``monitor_select`` asks for some of them; while the job
correlates, each integration of each selected product arrives. Its delay and SNR are published as
``AttributeChanged`` events (``kind="monitor"``, key = the job), so rules and dashboards see them;
the spectra (amplitude, phase, lags, and their scan means) are too big for events and are returned
by ``monitor_data``. The monitor's MESSAGE/WARNING/ERROR become ``LogLine`` events
(``stream="monitor"``). ``monitor_stop`` sends CLOSE_CONNECTION.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import structlog

from flowbus.schemas import (
    AttributeChanged,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    ErrorEvent,
    Event,
    LogLine,
)

from ._ops import OPS, _path
from ._streams import _Pending
from .monitor import (
    MonitorDecoder,
    MonitorEvent,
    MonitorText,
    Product,
    ProductTable,
    VisibilityBlock,
    encode_close,
    encode_fft_size,
    encode_input_path,
    encode_requests,
)
from .protocol import PacketId, StreamItem, StreamKind, encode, encode_int

if TYPE_CHECKING:
    from ._session import GuiserverSession

_log = structlog.get_logger("flowbus.guiserver.monitor")
#: the largest FFT size accepted for the lag plots (the source sizes its buffers from it)
MAX_FFT = 1 << 16


class Monitor:
    """One real-time monitor: its sub-stream, what it said, the product table and the latest blocks."""

    def __init__(self, session: GuiserverSession, port: int, input: str) -> None:
        self.session, self.port, self.input = session, port, input
        self.job = PurePosixPath(input).stem
        self.decoder = MonitorDecoder()
        #: the session's pending entry for the sub-stream: ``done`` once a direct back-connection closed
        self.op: Any = None
        self.table: ProductTable | None = None
        self.texts: list[MonitorText] = []
        self.latest: dict[int, VisibilityBlock] = {}
        self.blocks = 0
        self.requested: list[int] = []
        self.failed = ""
        self.ended = False

    def lost(self) -> None:
        self.ended = True

    def over(self) -> bool:
        return self.ended or (self.op is not None and bool(self.op.done))

    def on_item(self, item: Any) -> None:
        """Each chunk of the sub-stream (lock held, the reader thread)."""
        if not isinstance(item, StreamItem) or not item.data or self.ended:
            return
        try:
            events = self.decoder.feed(item.data)
        except BackendProtocolError as exc:
            self.failed, self.ended = str(exc), True
            self.session._publish([self.session._ev(ErrorEvent, key=self.job, message=str(exc),
                                                    error_type="flowbus.schemas.BackendProtocolError",
                                                    operation=f"monitor {self.port}")])
            return
        out: list[Event] = []
        for ev in events:
            out.extend(self._event(ev))
        if out:
            self.session._publish(out)

    def _event(self, ev: MonitorEvent) -> list[Event]:
        s = self.session
        if isinstance(ev, MonitorText):
            self.texts.append(ev)
            if ev.level == "error":  # the source stops the exchange after every ERROR it sends
                self.failed = ev.text
            return [s._ev(LogLine, key=self.job, level=ev.level, message=ev.text, stream="monitor")]
        if isinstance(ev, ProductTable):
            self.table = ev
            return []
        self.latest[ev.product] = ev
        self.blocks += 1
        return [s._ev(AttributeChanged, key=self.job, kind="monitor", name=f"product{ev.product}.{name}",
                      value=value)
                for name, value in (("delay", ev.delay), ("snr", ev.snr)) if not math.isnan(value)]


def _monitor(session: GuiserverSession, monitor: object) -> Monitor:
    mon: Monitor | None = session._monitors.get(monitor) if isinstance(monitor, int) else None
    if mon is None:
        raise BackendRejected(f"no real-time monitor {monitor!r} on session {session.name!r} "
                              f"(open: {sorted(session._monitors) or 'none'})")
    return mon


def _wait(session: GuiserverSession, mon: Monitor, operation: str, done: Any, timeout: float | None) -> None:
    """Wait (lock held) until ``done()``; raise on the monitor's ERROR, its end or a lost connection."""
    conn, limit = session._conn, timeout or session.config.request_timeout
    ok = session._cond.wait_for(lambda: done() or bool(mon.failed) or mon.over() or session._conn is not conn, limit)
    if mon.failed:
        _close(session, mon)
        cls = BackendRejected if "input file" in mon.failed else BackendUnavailable
        raise cls(f"{operation}: guiServer's monitor for {mon.input}: {mon.failed}")
    if not ok:
        raise BackendTimeout(f"{operation}: no answer on monitor sub-stream {mon.port} within {limit} s")
    if done():
        return
    if session._conn is not conn or mon.over():
        _close(session, mon)
        raise BackendUnavailable(f"{operation}: the monitor's sub-stream {mon.port} to {session.address} ended")


def _close(session: GuiserverSession, mon: Monitor) -> None:
    mon.ended = True
    session._monitors.pop(mon.port, None)
    session._pending.pop(mon.port, None)  # late bytes go to the translator, which ignores raw items


def _table(mon: Monitor) -> dict[str, Any]:
    t = mon.table
    assert t is not None
    return {"monitor": mon.port, "input": mon.input, "job": t.job, "obs_code": t.obs_code,
            "scans": [asdict(s) for s in t.scans], "products": [asdict(p) for p in t.products],
            "messages": [f"[{m.level}] {m.text}" for m in mon.texts]}


def _check_selection(operation: str, products: object, fft_size: object) -> None:
    if not isinstance(fft_size, int) or isinstance(fft_size, bool) or not 0 <= fft_size <= MAX_FFT or fft_size % 2:
        raise BackendRejected(f"{operation}: fft_size {fft_size!r} is not an even int in 0..{MAX_FFT}")
    if not isinstance(products, list) or not products or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in products):
        raise BackendRejected(f"{operation}: products {products!r} is not a non-empty list of product indices")


@OPS.op
def monitor_start(session: GuiserverSession, input: str, products: list[int] | None = None, fft_size: int = 0,
                  timeout: float | None = None) -> dict[str, Any]:
    """START_DIFX_MONITOR for the job ``input`` (its ``.input`` path): the product table.

    Returns ``monitor`` (the id the other monitor operations take), ``job``, ``obs_code``,
    ``scans`` and ``products`` (``index``, ``offset``, ``channels``, ``scan``, ``telescope1``,
    ``telescope2``, ``frequency`` MHz, ``autocorrelation``, ``baseline``, ``pol_product``, ...) and
    the monitor's ``messages``. With ``products`` it also selects them (:func:`monitor_select`).
    A monitor ERROR (e.g. the ``.input`` cannot be parsed) raises and ends the monitor."""
    path = _path(session, input, "input")
    if not path.endswith(".input"):
        raise BackendRejected(f"monitor_start: input {path!r} is not a .input file")
    if products is not None:
        _check_selection("monitor_start", products, fft_size)
    with session._lock:
        session._require_up("monitor_start")
        port = session._open_port(StreamKind.BYTES, frozenset())
        mon = session._monitors[port] = Monitor(session, port, path)
        mon.op = session._pending[port] = _Pending(port, StreamKind.BYTES, on_item=mon.on_item)
        try:
            session._send(encode(PacketId.START_DIFX_MONITOR, encode_int(port)))
            _wait(session, mon, "monitor_start", lambda: port in session._open_ports, timeout)
            session._stream_write(port, encode_input_path(path))
            _wait(session, mon, "monitor_start", lambda: mon.table is not None, timeout)
        except BaseException:
            if mon.port in session._monitors:
                _stop(session, mon)
            raise
        out = _table(mon)
    if products:
        try:
            out["selected"] = monitor_select(session, port, products, fft_size, timeout)
        except BaseException:  # the caller never learns the id: do not leave the monitor open
            with session._lock:
                if port in session._monitors:
                    _stop(session, mon)
            raise
    return out


@OPS.op
def monitor_select(session: GuiserverSession, monitor: int, products: list[int], fft_size: int = 0,
                   timeout: float | None = None) -> str:
    """Ask for ``products`` (indices from the table), replacing any earlier selection; returns the
    monitor's answer. ``fft_size`` (even, 0 = twice the channels) sizes the lag plots; it is always
    sent, because the source leaves it unset otherwise."""
    _check_selection("monitor_select", products, fft_size)
    with session._lock:
        session._require_up("monitor_select")
        mon = _monitor(session, monitor)
        assert mon.table is not None
        known: dict[int, Product] = {}
        for p in mon.table.products:  # indices restart each scan; the source's list keeps the first
            known.setdefault(p.index, p)
        missing = [i for i in products if i not in known]
        if missing:
            raise BackendRejected(f"monitor_select: no product {missing} in {mon.input} "
                                  f"(indices 0..{len(known) - 1})")
        before = len(mon.texts)
        session._stream_write(mon.port, encode_fft_size(fft_size) + encode_requests(
            [(i, known[i].offset, known[i].channels) for i in products]))
        mon.requested = list(products)
        _wait(session, mon, "monitor_select", lambda: len(mon.texts) > before, timeout)
        return mon.texts[before].text


@OPS.op
def monitor_data(session: GuiserverSession, monitor: int, after: int = 0,
                 timeout: float | None = None) -> dict[str, Any]:
    """The latest integration of each selected product, once more than ``after`` have arrived
    (waits up to ``timeout``). Returns ``count`` (integrations received so far; pass it as
    ``after`` next time) and ``blocks``: ``product``, ``timestamp``, ``integration``, ``scan``,
    ``source``, ``delay``, ``snr``, ``max_channel``, ``mean_delay``, ``mean_snr`` and the spectra
    ``amplitude``, ``phase``, ``lags`` and ``mean_*``."""
    with session._lock:
        mon = _monitor(session, monitor)
        _wait(session, mon, "monitor_data", lambda: mon.blocks > after, timeout)
        blocks = []
        for b in sorted(mon.latest.values(), key=lambda b: b.product):
            row = {k: v for k, v in asdict(b).items() if k != "spectra"}
            row.update({k: list(v) for k, v in b.spectra.items()})
            blocks.append(row)
        return {"count": mon.blocks, "blocks": blocks}


def _stop(session: GuiserverSession, mon: Monitor) -> None:
    try:
        if session._conn is not None and mon.port in session._open_ports:
            session._stream_write(mon.port, encode_close())
    finally:
        _close(session, mon)


@OPS.op
def monitor_stop(session: GuiserverSession, monitor: int) -> None:
    """CLOSE_CONNECTION: the server stops the monitor and closes its sub-stream."""
    with session._lock:
        _stop(session, _monitor(session, monitor))


@OPS.op
def monitors(session: GuiserverSession) -> list[dict[str, Any]]:
    """The session's open monitors: ``monitor``, ``input``, ``requested`` products, ``count``."""
    with session._lock:
        return [{"monitor": m.port, "input": m.input, "requested": list(m.requested), "count": m.blocks}
                for m in session._monitors.values()]
