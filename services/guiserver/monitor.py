"""Sans-I/O core of guiServer's real-time monitor (START_DIFX_MONITOR, docs/protocols/guiserver.md §5.9).

Read from DiFX's source (``DifxMonitorExchange.h``, ``runDifxMonitor.cpp``, ``GUIClient.h``); a
real guiServer built without mpifxcorr's library stubs the monitor, so this was checked against the
source only. The exchange runs on one sub-stream (a channel or a direct back-connection), framed as
``[int32 id][int32 length][payload]`` big-endian in both directions:

* client -> server: INPUT_FILE_PATH (the job's ``.input``), FFT_SIZE, START_PRODUCT_REQUESTS,
  PRODUCT_REQUEST ``[index, offset, channels]`` x n, END_PRODUCT_REQUESTS, CLOSE_CONNECTION.
* server -> client: MESSAGE/WARNING/ERROR text; the product table (BEGIN_CORRELATION_PRODUCTS ..
  END_CORRELATION_PRODUCTS) read from the ``.input``; then, per product and integration,
  VISIBILITY_SCAN, SOURCE, AMPLITUDE/PHASE/LAG_DATA and their MEAN_* forms, END_VISIBILITY_BLOCK.
  Plot values travel as 14-character ``%14.6e`` strings; FREQUENCY as a big-endian double.

A defect of the source is part of the wire format: LAG_DATA, MEAN_AMPLITUDE_DATA, MEAN_PHASE_DATA
and MEAN_LAG_DATA declare a length 4 bytes short of what the server writes (one int more than the
length counts). :class:`MonitorFramer` reads those 4 bytes as part of the packet; the emulator writes
the same short headers (:func:`encode_data`).
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowbus.schemas import BackendProtocolError

from .protocol import DEFAULT_MAX_LENGTH, Packet, encode, encode_int

_HEAD = struct.Struct(">ii")
_DOUBLE = struct.Struct(">d")
#: width of one plot value (``snprintf(buffer, 15, "%14.6e")``, 14 chars sent)
VALUE_WIDTH = 14


class MonitorId(enum.IntEnum):
    """Packet ids of the monitor exchange (``DifxMonitorExchange.h``)."""

    MESSAGE = 100
    WARNING = 101
    ERROR = 102
    INPUT_FILE_PATH = 103
    CLOSE_CONNECTION = 104
    NUM_BASELINES = 105
    NUM_FREQUENCIES = 106
    BASELINE = 107
    FREQUENCY = 108
    NUM_SCANS = 109
    SCAN = 110
    TELESCOPE_1 = 111
    TELESCOPE_2 = 112
    BEGIN_CORRELATION_PRODUCTS = 113
    NUM_PHASE_CENTERS = 114
    PHASE_CENTER = 115
    NUM_PULSAR_BINS = 116
    PULSAR_BIN = 117
    NUM_POL_PRODUCTS = 118
    POL_PRODUCT = 119
    NEW_PRODUCT = 120
    AUTOCORRELATION = 121
    PRODUCT_REQUEST = 122
    START_PRODUCT_REQUESTS = 123
    END_PRODUCT_REQUESTS = 124
    VISIBILITY_DATA = 125
    AMPLITUDE_DATA = 126
    PHASE_DATA = 127
    LAG_DATA = 128
    END_VISIBILITY_BLOCK = 129
    JOB_NAME = 130
    OBS_CODE = 131
    SCAN_IDENTIFIER = 132
    SCAN_START_TIME = 133
    SCAN_END_TIME = 134
    SOURCE = 135
    SOURCE_RA = 136
    SOURCE_DEC = 137
    VISIBILITY_SCAN = 138
    FFT_SIZE = 139
    MEAN_AMPLITUDE_DATA = 140
    MEAN_PHASE_DATA = 141
    MEAN_LAG_DATA = 142
    END_CORRELATION_PRODUCTS = 143


M = MonitorId
#: ids whose declared length is 4 bytes short of the payload the source writes
SHORT_BY_4 = frozenset({M.LAG_DATA, M.MEAN_AMPLITUDE_DATA, M.MEAN_PHASE_DATA, M.MEAN_LAG_DATA})
_LEVELS = {int(M.MESSAGE): "info", int(M.WARNING): "warning", int(M.ERROR): "error"}
_SPECTRA = {int(M.AMPLITUDE_DATA): "amplitude", int(M.PHASE_DATA): "phase",
            int(M.MEAN_AMPLITUDE_DATA): "mean_amplitude", int(M.MEAN_PHASE_DATA): "mean_phase"}
_LAGS = {int(M.LAG_DATA): "", int(M.MEAN_LAG_DATA): "mean_"}


# -- framing -------------------------------------------------------------------------------------


class MonitorFramer:
    """Monitor packets from a byte stream cut anywhere (the source's short lengths included)."""

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self._buf = bytearray()
        self.max_length = max_length

    def feed(self, data: bytes) -> list[Packet]:
        self._buf.extend(data)
        out: list[Packet] = []
        while len(self._buf) >= 8:
            pid, n = _HEAD.unpack_from(self._buf)
            if n < 0 or n > self.max_length:
                raise BackendProtocolError(f"monitor packet {pid}: length {n} outside 0..{self.max_length}")
            body = n + 4 if pid in SHORT_BY_4 else n
            if len(self._buf) < 8 + body:
                break
            out.append(Packet(pid, bytes(self._buf[8:8 + body])))
            del self._buf[:8 + body]
        return out


# -- client -> server ----------------------------------------------------------------------------


def encode_input_path(path: str) -> bytes:
    return encode(M.INPUT_FILE_PATH, path.encode())


def encode_fft_size(size: int) -> bytes:
    return encode(M.FFT_SIZE, encode_int(size))


def encode_requests(products: Sequence[tuple[int, int, int]]) -> bytes:
    """START_PRODUCT_REQUESTS, one PRODUCT_REQUEST ``[index, offset, channels]`` each, END_PRODUCT_REQUESTS."""
    body = b"".join(encode(M.PRODUCT_REQUEST, struct.pack(">iii", *p)) for p in products)
    return encode(M.START_PRODUCT_REQUESTS) + body + encode(M.END_PRODUCT_REQUESTS)


def encode_close() -> bytes:
    return encode(M.CLOSE_CONNECTION)


# -- server -> client (the emulator) ------------------------------------------------------------


def encode_text(pid: int, text: str) -> bytes:
    return encode(pid, text.encode())


def encode_ints(pid: int, *values: int) -> bytes:
    return encode(pid, b"".join(encode_int(v) for v in values))


def encode_double(pid: int, value: float) -> bytes:
    return encode(pid, _DOUBLE.pack(value))


def format_values(values: Sequence[float]) -> bytes:
    return b"".join(f"{v:14.6e}"[:VALUE_WIDTH].encode() for v in values)


def encode_data(pid: int, ints: Sequence[int], values: Sequence[float]) -> bytes:
    """A plot packet as the source composes it, with its declared length (short by 4 where it is)."""
    body = b"".join(encode_int(v) for v in ints) + format_values(values)
    declared = len(body) - (4 if pid in SHORT_BY_4 else 0)
    return _HEAD.pack(pid, declared) + body


# -- decoded -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorText:
    """MESSAGE / WARNING / ERROR of the monitor exchange."""

    level: str
    text: str


@dataclass(frozen=True)
class Scan:
    index: int
    identifier: str = ""
    start_mjd: float = 0.0
    end_mjd: float = 0.0
    source: str = ""
    ra: float = 0.0
    dec: float = 0.0


@dataclass(frozen=True)
class Product:
    """One correlation product of a scan (``NEW_PRODUCT``) with what preceded it."""

    index: int
    offset: int
    channels: int
    scan: int
    telescope1: str
    telescope2: str
    frequency: float
    autocorrelation: bool = False
    baseline: int = -1
    phase_center: int = 0
    pulsar_bin: int = 0
    pol_product: int = 0


@dataclass(frozen=True)
class ProductTable:
    """Everything between BEGIN_ and END_CORRELATION_PRODUCTS."""

    job: str
    obs_code: str
    scans: tuple[Scan, ...]
    products: tuple[Product, ...]


@dataclass(frozen=True)
class VisibilityBlock:
    """One product's plots for one integration (ended by END_VISIBILITY_BLOCK)."""

    product: int
    timestamp: int
    integration: int
    scan: str
    source: str
    spectra: dict[str, tuple[float, ...]]
    delay: float = math.nan
    snr: float = math.nan
    max_channel: int = -1
    mean_delay: float = math.nan
    mean_snr: float = math.nan


MonitorEvent = MonitorText | ProductTable | VisibilityBlock


@dataclass
class _Table:
    job: str = ""
    obs_code: str = ""
    scans: list[Scan] = field(default_factory=list)
    products: list[Product] = field(default_factory=list)
    scan: dict[str, object] = field(default_factory=dict)
    ctx: dict[str, object] = field(default_factory=dict)


def _int(p: Packet, at: int = 0) -> int:
    if len(p.payload) < at + 4:
        raise BackendProtocolError(f"monitor packet {p.id}: {len(p.payload)} bytes, an int32 at {at} expected")
    return int(struct.unpack_from(">i", p.payload, at)[0])


def _values(p: Packet, at: int, n: int) -> tuple[float, ...]:
    end = at + n * VALUE_WIDTH
    if n < 0 or len(p.payload) < end:
        raise BackendProtocolError(f"monitor packet {p.id}: {len(p.payload)} bytes, {n} values from {at} expected")
    try:
        return tuple(float(p.payload[i:i + VALUE_WIDTH]) for i in range(at, end, VALUE_WIDTH))
    except ValueError as exc:
        raise BackendProtocolError(f"monitor packet {p.id}: a value is not a number ({exc})") from exc


def _float(text: str, p: Packet) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise BackendProtocolError(f"monitor packet {p.id}: {text!r} is not a number") from exc


class MonitorDecoder:
    """Bytes of the monitor sub-stream in, :data:`MonitorEvent` objects out."""

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self._framer = MonitorFramer(max_length)
        self._table: _Table | None = None
        self._scan = ""
        self._source = ""
        self._block: dict[str, object] = {}
        self._spectra: dict[str, tuple[float, ...]] = {}

    def feed(self, data: bytes) -> list[MonitorEvent]:
        out: list[MonitorEvent] = []
        for p in self._framer.feed(data):
            ev = self._packet(p)
            if ev is not None:
                out.append(ev)
        return out

    def _packet(self, p: Packet) -> MonitorEvent | None:
        pid, text = p.id, p.payload.decode("utf-8", errors="replace")
        if pid in _LEVELS:
            return MonitorText(_LEVELS[pid], text.rstrip("\n"))
        if pid == M.BEGIN_CORRELATION_PRODUCTS:
            self._table = _Table()
            return None
        if self._table is not None:
            return self._describe(self._table, p, text)
        if pid == M.VISIBILITY_SCAN:
            self._scan = text
        elif pid == M.SOURCE:
            self._source = text
        elif pid in _SPECTRA:
            product, n, ts, integration = (_int(p, i) for i in (0, 4, 8, 12))
            self._block.update(product=product, timestamp=ts, integration=integration)
            self._spectra[_SPECTRA[pid]] = _values(p, 16, n)
        elif pid in _LAGS:
            prefix = _LAGS[pid]
            product, half, ts, integration, peak = (_int(p, i) for i in (0, 4, 8, 12, 16))
            delay, snr = _values(p, 20, 2)
            self._block.update({"product": product, "timestamp": ts, "integration": integration,
                                f"{prefix}delay": delay, f"{prefix}snr": snr})
            if not prefix:
                self._block["max_channel"] = peak
            self._spectra[f"{prefix}lags"] = _values(p, 20 + 2 * VALUE_WIDTH, 2 * half)
        elif pid == M.END_VISIBILITY_BLOCK:
            b, self._block = self._block, {}
            spectra, self._spectra = self._spectra, {}
            return VisibilityBlock(
                product=int(b.get("product", -1)), timestamp=int(b.get("timestamp", 0)),  # type: ignore[call-overload]
                integration=int(b.get("integration", 0)), scan=self._scan, source=self._source,  # type: ignore[call-overload]
                spectra=spectra, delay=float(b.get("delay", math.nan)),  # type: ignore[arg-type]
                snr=float(b.get("snr", math.nan)), max_channel=int(b.get("max_channel", -1)),  # type: ignore[arg-type,call-overload]
                mean_delay=float(b.get("mean_delay", math.nan)),  # type: ignore[arg-type]
                mean_snr=float(b.get("mean_snr", math.nan)))  # type: ignore[arg-type]
        return None

    def _describe(self, t: _Table, p: Packet, text: str) -> MonitorEvent | None:
        pid, ctx = p.id, t.ctx
        if pid == M.JOB_NAME:
            t.job = text
        elif pid == M.OBS_CODE:
            t.obs_code = text
        elif pid == M.SCAN:
            self._end_scan(t)
            t.scan = {"index": _int(p)}
            ctx.clear()
            ctx["scan"] = _int(p)
        elif pid in (M.SCAN_IDENTIFIER, M.SOURCE):
            t.scan["identifier" if pid == M.SCAN_IDENTIFIER else "source"] = text
        elif pid in (M.SCAN_START_TIME, M.SCAN_END_TIME, M.SOURCE_RA, M.SOURCE_DEC):
            name = {M.SCAN_START_TIME: "start_mjd", M.SCAN_END_TIME: "end_mjd", M.SOURCE_RA: "ra",
                    M.SOURCE_DEC: "dec"}[M(pid)]
            t.scan[name] = _float(text, p)
        elif pid == M.BASELINE:
            ctx.update(baseline=_int(p), autocorrelation=False)
        elif pid in (M.TELESCOPE_1, M.TELESCOPE_2):
            ctx["telescope1" if pid == M.TELESCOPE_1 else "telescope2"] = text
        elif pid == M.AUTOCORRELATION:
            ctx.update(autocorrelation=True, telescope1=text, telescope2="", baseline=-1,
                       phase_center=0, pulsar_bin=0, pol_product=0)
        elif pid == M.FREQUENCY:
            if len(p.payload) != 8:
                raise BackendProtocolError(f"monitor FREQUENCY of {len(p.payload)} bytes, 8 expected")
            ctx["frequency"] = _DOUBLE.unpack(p.payload)[0]
        elif pid in (M.PHASE_CENTER, M.PULSAR_BIN, M.POL_PRODUCT):
            ctx[{M.PHASE_CENTER: "phase_center", M.PULSAR_BIN: "pulsar_bin",
                 M.POL_PRODUCT: "pol_product"}[M(pid)]] = _int(p)
        elif pid == M.NEW_PRODUCT:
            index, offset, channels = _int(p, 0), _int(p, 4), _int(p, 8)
            t.products.append(Product(
                index, offset, channels, scan=int(ctx.get("scan", -1)),  # type: ignore[call-overload]
                telescope1=str(ctx.get("telescope1", "")), telescope2=str(ctx.get("telescope2", "")),
                frequency=float(ctx.get("frequency", math.nan)),  # type: ignore[arg-type]
                autocorrelation=bool(ctx.get("autocorrelation", False)),
                baseline=int(ctx.get("baseline", -1)),  # type: ignore[call-overload]
                phase_center=int(ctx.get("phase_center", 0)),  # type: ignore[call-overload]
                pulsar_bin=int(ctx.get("pulsar_bin", 0)),  # type: ignore[call-overload]
                pol_product=int(ctx.get("pol_product", 0))))  # type: ignore[call-overload]
        elif pid == M.END_CORRELATION_PRODUCTS:
            self._end_scan(t)
            self._table = None
            return ProductTable(t.job, t.obs_code, tuple(t.scans), tuple(t.products))
        return None

    @staticmethod
    def _end_scan(t: _Table) -> None:
        if t.scan:
            try:
                t.scans.append(Scan(**t.scan))  # type: ignore[arg-type]
            except TypeError as exc:
                raise BackendProtocolError(f"monitor scan description: {exc}") from exc
            t.scan = {}
