"""The emulator's real-time monitor (START_DIFX_MONITOR, docs/protocols/guiserver.md §5.9).

The packet sequences are those of DiFX's ``DifxMonitorExchange.h`` (wire format in
:mod:`flowbus.services.guiserver.monitor`, short LAG/MEAN_* headers included). There is no
mpifxcorr and no monitor_server: the product table comes from a reduced reader of the job's
``.input`` and ``.calc`` (:func:`read_job`: telescopes, the frequency table, the baselines'
datastream indices, ``POL PRODUCTS``, and the scans and sources of the ``.calc``; every baseline
correlates every frequency), and while a job on that ``.input`` runs in the emulator each selected
product gets one synthetic integration every ``monitor_interval`` seconds (a delay of
``product + 1`` lag channels, SNR ``10 + product``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..guiserver.monitor import MonitorId as M
from ..guiserver.monitor import encode_data, encode_double, encode_ints, encode_text
from ..guiserver.protocol import decode_int
from ._jobs import Client, Stream


@dataclass
class JobTable:
    """What the emulator knows of a job from its .input and .calc."""

    job: str
    obs_code: str
    start_mjd: int
    start_seconds: int
    int_time: int
    telescopes: list[str]
    freqs: list[tuple[float, float, int]]  # (MHz, bandwidth MHz, channels after averaging)
    baselines: list[tuple[int, int, int]]  # (telescope A, telescope B, pol products)
    scans: list[dict[str, Any]] = field(default_factory=list)


def _pairs(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def read_job(inp: Path, client_path: str) -> JobTable | None:
    """The reduced .input/.calc reader; None where mpifxcorr's parser would fail."""
    try:
        kv = _pairs(inp)

        def one(d: dict[str, list[str]], key: str, default: str | None = None) -> str:
            if key in d:
                return d[key][0]
            if default is None:
                raise KeyError(key)
            return default

        calc_name = one(kv, "CALC FILENAME")
        calc = Path(str(inp.parent / PurePosixPath(calc_name).name))
        ck = _pairs(calc)
        telescopes = [one(kv, f"TELESCOPE NAME {i}") for i in range(int(one(kv, "TELESCOPE ENTRIES")))]
        freqs = [(float(one(kv, f"FREQ (MHZ) {i}")), float(one(kv, f"BW (MHZ) {i}")),
                  int(one(kv, f"NUM CHANNELS {i}")) // max(1, int(one(kv, f"CHANS TO AVG {i}", "1"))))
                 for i in range(int(one(kv, "FREQ ENTRIES")))]
        ds = [int(v) for v in kv.get("TELESCOPE INDEX", [])] or list(range(len(telescopes)))
        baselines = [(ds[int(one(kv, f"D/STREAM A INDEX {i}"))], ds[int(one(kv, f"D/STREAM B INDEX {i}"))],
                      int(one(kv, f"POL PRODUCTS {i}/0", "1")))
                     for i in range(int(one(kv, "BASELINE ENTRIES", "0")))]
        table = JobTable(PurePosixPath(client_path).stem, one(ck, "OBSCODE"), int(one(ck, "START MJD")),
                         int(float(one(ck, "START SEC", "0"))), max(1, round(float(one(kv, "INT TIME (SEC)", "1")))),
                         telescopes, freqs, baselines)
        for s in range(int(one(ck, "NUM SCANS"))):
            start, dur = float(one(ck, f"SCAN {s} START (S)")), float(one(ck, f"SCAN {s} DUR (S)"))
            src = int(one(ck, f"SCAN {s} POINTING SRC", "0"))
            base = table.start_mjd + table.start_seconds / 86400.0
            table.scans.append({"id": one(ck, f"SCAN {s} IDENTIFIER"), "start": base + start / 86400.0,
                                "end": base + (start + dur) / 86400.0, "source": one(ck, f"SOURCE {src} NAME"),
                                "ra": float(one(ck, f"SOURCE {src} RA")), "dec": float(one(ck, f"SOURCE {src} DEC"))})
        if not telescopes or not freqs or not table.scans:
            return None
        return table
    except (OSError, KeyError, ValueError, IndexError):
        return None


class Exchange:
    """One monitor exchange: reads the client's packets, answers as DifxMonitorExchange does."""

    def __init__(self, emu: Any, c: Client, s: Stream, port: int) -> None:
        self.emu, self.c, self.s, self.port = emu, c, s, port
        self.closed = threading.Event()
        self.table: JobTable | None = None
        self.input = ""
        self.fft = 0
        self.pending: list[tuple[int, int, int]] = []
        self.requests: list[tuple[int, int, int]] = []
        self.products: list[dict[str, Any]] = []
        self.data_thread: threading.Thread | None = None
        self._buf = b""
        self._lock = threading.Lock()
        if s.sock is not None:
            s.sock.settimeout(1.0)

    def send(self, data: bytes) -> None:
        with self._lock:
            self.s.raw(data)

    def _read(self, n: int) -> bytes | None:
        while self.emu._running and self.c.alive and not self.closed.is_set():
            if self.s.sock is None:
                got = self.c.take(self.port, n, 1.0)
                if got is not None:
                    return got
                continue
            while len(self._buf) < n:
                try:
                    more = self.s.sock.recv(65536)
                except TimeoutError:
                    break
                except OSError:
                    return None
                if not more:
                    return None
                self._buf += more
            if len(self._buf) >= n:
                out, self._buf = self._buf[:n], self._buf[n:]
                return out
        return None

    def run(self) -> None:
        try:
            while (head := self._read(8)) is not None:
                pid, n = decode_int(head), decode_int(head, 4)
                body = self._read(n) if n > 0 else b""
                if body is None or n < 0:
                    break
                if not self.packet(pid, body):
                    break
        finally:
            self.closed.set()
            self.s.close()

    def packet(self, pid: int, body: bytes) -> bool:
        """One client packet; False when the exchange ends."""
        if pid == M.INPUT_FILE_PATH:
            return self.input_path(body.split(b"\0")[0].decode(errors="replace"))
        if pid == M.CLOSE_CONNECTION:
            return False
        if pid == M.FFT_SIZE and len(body) == 4:
            self.fft = decode_int(body)
        elif pid == M.START_PRODUCT_REQUESTS:
            self.pending = []
        elif pid == M.PRODUCT_REQUEST and len(body) >= 12:
            self.pending.append((decode_int(body), decode_int(body, 4), decode_int(body, 8)))
        elif pid == M.END_PRODUCT_REQUESTS and self.pending:
            self.requests = list(self.pending)
            self.send(encode_text(M.MESSAGE, "data product requests sent to monitor_server"))
            if self.data_thread is not None and self.data_thread.is_alive():
                self.send(encode_text(M.WARNING, "a thread is already monitoring data products - "
                                                 "a new one cannot be started!"))
            else:
                self.data_thread = threading.Thread(target=self.visibilities, daemon=True, name="emu-monitor-data")
                self.data_thread.start()
        return True

    def input_path(self, path: str) -> bool:
        if self.emu.monitor_server_up:
            self.send(encode_text(M.MESSAGE, "located monitor_server instance: root 1 0 monitor_server 9999\n"))
        else:
            self.emu.monitor_server_up = True
            self.send(encode_text(M.WARNING, f"monitor_server needs to be started - executing: {self.c.setup} "
                                             "monitor_server 9999 &> /dev/null &\n"))
        self.send(encode_text(M.MESSAGE, "connection established with monitor_server"))
        table = read_job(self.emu.real(path), path)
        if table is None:
            self.send(encode_text(M.ERROR, f"Configuration had a problem parsing input file {path} - "
                                           "real time monitor will not run"))
            return False
        self.table, self.input = table, path
        self.describe(table)
        return True

    def describe(self, t: JobTable) -> None:
        out = [encode_text(M.BEGIN_CORRELATION_PRODUCTS, ""), encode_ints(M.NUM_SCANS, len(t.scans)),
               encode_text(M.JOB_NAME, t.job), encode_text(M.OBS_CODE, t.obs_code)]
        self.products = []
        for si, scan in enumerate(t.scans):
            out += [encode_ints(M.SCAN, si), encode_text(M.SCAN_IDENTIFIER, scan["id"]),
                    encode_text(M.SCAN_START_TIME, f"{scan['start']:.7f}"),
                    encode_text(M.SCAN_END_TIME, f"{scan['end']:.7f}"), encode_text(M.SOURCE, scan["source"]),
                    encode_text(M.SOURCE_RA, f"{scan['ra']:.15f}"), encode_text(M.SOURCE_DEC, f"{scan['dec']:.15f}"),
                    encode_ints(M.NUM_BASELINES, len(t.baselines))]
            n, offset = 0, 0
            for bi, (a, b, npol) in enumerate(t.baselines):
                out += [encode_ints(M.BASELINE, bi), encode_text(M.TELESCOPE_1, t.telescopes[a]),
                        encode_text(M.TELESCOPE_2, t.telescopes[b]), encode_ints(M.NUM_FREQUENCIES, len(t.freqs))]
                for mhz, bw, chans in t.freqs:
                    out += [encode_double(M.FREQUENCY, mhz), encode_ints(M.NUM_PHASE_CENTERS, 1),
                            encode_ints(M.PHASE_CENTER, 0), encode_ints(M.NUM_PULSAR_BINS, 1),
                            encode_ints(M.PULSAR_BIN, 0), encode_ints(M.NUM_POL_PRODUCTS, npol)]
                    for k in range(npol):
                        out += [encode_ints(M.POL_PRODUCT, k), encode_ints(M.NEW_PRODUCT, n, offset, chans)]
                        if si == 0:
                            self.products.append({"bandwidth": bw, "channels": chans})
                        n += 1
                    offset += chans * npol
            for tel in t.telescopes:
                for mhz, bw, chans in t.freqs:
                    out += [encode_text(M.AUTOCORRELATION, tel), encode_double(M.FREQUENCY, mhz),
                            encode_ints(M.NEW_PRODUCT, n, offset, chans)]
                    if si == 0:
                        self.products.append({"bandwidth": bw, "channels": chans})
                    n += 1
                    offset += chans
        out.append(encode_text(M.END_CORRELATION_PRODUCTS, ""))
        self.send(b"".join(out))

    def _running(self) -> bool:
        job = self.emu._jobs.get(self.input)
        return job is not None and not job.stopped.is_set()

    def visibilities(self) -> None:
        """One integration per selected product and tick while the job runs; times out after it ends."""
        t, tick, seen, idle = self.table, self.emu.monitor_interval, False, 0
        assert t is not None
        while not self.closed.wait(tick):
            if not self._running():
                idle += 1
                if seen and idle > 3:
                    self.send(encode_text(M.WARNING, "real-time monitor thread has timed out after "
                                                     f"{2 * idle} seconds of inactivity"))
                    return
                continue
            seen, idle = True, 0
            scan = t.scans[0]
            block = [encode_text(M.VISIBILITY_SCAN, scan["id"]), encode_text(M.SOURCE, scan["source"])]
            for index, _offset, chans in list(self.requests):
                if 0 <= index < len(self.products):
                    block += _integration(index, chans, self.products[index]["bandwidth"], self.fft,
                                          t.start_seconds, t.int_time)
            if self.c.alive and not self.closed.is_set():
                self.send(b"".join(block))


def _integration(product: int, chans: int, bandwidth: float, fft_size: int, ts: int, int_time: int) -> list[bytes]:
    """The packets of one integration of one product, as the source composes them."""
    fft = max(fft_size, 2 * chans)
    peak = min(product + 1, fft // 2 - 1)
    delay = peak / (2.0 * bandwidth) * (chans / fft)
    snr = 10.0 + product
    amp = [1.0 + 0.1 * product] * chans
    phase = [math.degrees(math.remainder(2 * math.pi * peak * k / fft * 2, 2 * math.pi)) for k in range(chans)]
    lags = [snr if i == peak else 1.0 for i in range(fft)]
    half = fft // 2
    lag_values = [delay, snr, *lags[half:], *lags[:half]]
    out = []
    for prefix in ("", "MEAN_"):
        out += [encode_data(M[f"{prefix}AMPLITUDE_DATA"], (product, chans, ts, int_time), amp),
                encode_data(M[f"{prefix}PHASE_DATA"], (product, chans, ts, int_time), phase)]
        if not prefix:
            out.append(encode_data(M.LAG_DATA, (product, half, ts, int_time, peak), lag_values))
    out.append(encode_data(M.MEAN_LAG_DATA, (product, half, ts, int_time, peak), lag_values))
    out.append(encode_text(M.END_VISIBILITY_BLOCK, ""))
    return out


def run_monitor(emu: Any, c: Client, payload: bytes) -> None:
    """START_DIFX_MONITOR ``[int32 port]``: connect back (or open a channel) and run the exchange."""
    if len(payload) < 4:
        return
    port = decode_int(payload)
    try:
        s = Stream(c, port, "127.0.0.1")  # the source connects back to the client's peer address
    except (TimeoutError, OSError):
        return
    Exchange(emu, c, s, port).run()
