"""The real-time monitor (START_DIFX_MONITOR, docs/protocols/guiserver.md §5.9): the sans-I/O core,
and the monitor operations against the emulator in channelled and direct mode.

Every wait is bounded; no sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from flowbus.schemas import (
    AttributeChanged,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Connected,
    LogLine,
)
from flowbus.services.guiserver import monitor as mx
from flowbus.services.guiserver.protocol import PacketId, decode_int, encode, encode_int
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.guiserver import (
    Host,
    emulator_fixture,  # noqa: F401 - provides the `emulator` fixture
    host_fixture,  # noqa: F401 - provides the `host` fixture
    wait_for,
)

INPUT = """# COMMON SETTINGS ##!
CALC FILENAME:      /data/exp/mon_1.calc
START MJD:          57000
START SECONDS:      3600
INT TIME (SEC):     2.000000

# FREQ TABLE #######!
FREQ ENTRIES:       2
FREQ (MHZ) 0:       8400.990000000
BW (MHZ) 0:         16.000000000000
SIDEBAND 0:         U
NUM CHANNELS 0:     32
CHANS TO AVG 0:     1
FREQ (MHZ) 1:       8416.990000000
BW (MHZ) 1:         16.000000000000
SIDEBAND 1:         U
NUM CHANNELS 1:     64
CHANS TO AVG 1:     2

# TELESCOPE TABLE ##!
TELESCOPE ENTRIES:  2
TELESCOPE NAME 0:   KP
TELESCOPE NAME 1:   LA

# DATASTREAM TABLE #!
DATASTREAM ENTRIES: 2
TELESCOPE INDEX:    0
TELESCOPE INDEX:    1

# BASELINE TABLE ###!
BASELINE ENTRIES:   1
D/STREAM A INDEX 0: 0
D/STREAM B INDEX 0: 1
NUM FREQS 0:        2
POL PRODUCTS 0/0:   2
"""

CALC = """JOB ID:             1
OBSCODE:            MT001
START MJD:          57000
START SEC:          3600
NUM SCANS:          2
SCAN 0 IDENTIFIER:  No0001
SCAN 0 START (S):   0
SCAN 0 DUR (S):     30
SCAN 0 POINTING SRC:0
SCAN 1 IDENTIFIER:  No0002
SCAN 1 START (S):   30
SCAN 1 DUR (S):     30
SCAN 1 POINTING SRC:1
SOURCE 0 NAME:      3C273
SOURCE 0 RA:        3.265
SOURCE 0 DEC:       0.035
SOURCE 1 NAME:      3C279
SOURCE 1 RA:        3.377
SOURCE 1 DEC:       -0.102
"""
JOB = "/data/exp/mon_1.input"


def _rig(emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host], channelled: bool = True,
         **options: object) -> tuple[GuiserverEmulator, Host]:
    emu = emulator(**options)
    emu.real(JOB).write_text(INPUT)
    emu.real("/data/exp/mon_1.calc").write_text(CALC)
    return emu, host(emu.port, channelled=channelled)


# -- the sans-I/O core -----------------------------------------------------------------------------


class TestCore:
    def test_short_headers(self) -> None:
        """LAG and MEAN_* packets declare 4 bytes fewer than they carry (the source's counting); the
        framer reads them whole, whatever the chunking."""
        wire = b"".join(
            [mx.encode_data(mx.M.LAG_DATA, (3, 8, 3600, 2, 1), [0.5, 12.0, *range(16)]),
             mx.encode_data(mx.M.AMPLITUDE_DATA, (3, 4, 3600, 2), [1, 2, 3, 4]),
             mx.encode_text(mx.M.END_VISIBILITY_BLOCK, "")])
        assert decode_int(wire, 4) == 5 * 4 + 18 * mx.VALUE_WIDTH - 4
        whole = mx.MonitorDecoder().feed(wire)
        dec = mx.MonitorDecoder()
        bytewise = [ev for i in range(len(wire)) for ev in dec.feed(wire[i:i + 1])]
        assert whole == bytewise and len(whole) == 1
        block = whole[0]
        assert isinstance(block, mx.VisibilityBlock)
        assert (block.product, block.timestamp, block.integration, block.max_channel) == (3, 3600, 2, 1)
        assert (block.delay, block.snr) == (0.5, 12.0)
        assert block.spectra["lags"] == tuple(float(i) for i in range(16))
        assert block.spectra["amplitude"] == (1.0, 2.0, 3.0, 4.0)

    @pytest.mark.parametrize(("wire", "match"), [
        (mx.encode_data(mx.M.AMPLITUDE_DATA, (0, 2, 1, 1), [1.0]), "2 values"),
        (mx._HEAD.pack(mx.M.PHASE_DATA, 30) + encode_int(0) + encode_int(1) + b"\0" * 8 + b"not a number!!", "not a number"),
        (mx._HEAD.pack(mx.M.MESSAGE, -1), "length -1"),
        (mx.encode_text(mx.M.BEGIN_CORRELATION_PRODUCTS, "") + encode(mx.M.FREQUENCY, b"1234"), "FREQUENCY"),
    ])
    def test_bad_packets(self, wire: bytes, match: str) -> None:
        """Malformed monitor packets raise BackendProtocolError naming the packet."""
        with pytest.raises(BackendProtocolError, match=match):
            mx.MonitorDecoder().feed(wire)

    def test_requests(self) -> None:
        """The product request is START, one PRODUCT_REQUEST [index, offset, channels] each, END."""
        frames = mx.MonitorFramer().feed(mx.encode_requests([(1, 32, 32), (5, 96, 16)]))
        assert [f.id for f in frames] == [123, 122, 122, 124]
        assert [decode_int(frames[2].payload, i) for i in (0, 4, 8)] == [5, 96, 16]


# -- through the emulator --------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channelled", [True, False], ids=["channelled", "direct"])
class TestMonitor:
    def test_products(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                      channelled: bool) -> None:
        """monitor_start returns the job's scans and products as read from its .input/.calc."""
        emu, h = _rig(emulator, host, channelled)
        out = h.session.call("monitor_start", JOB)
        assert (out["job"], out["obs_code"]) == ("mon_1", "MT001")
        assert [s["identifier"] for s in out["scans"]] == ["No0001", "No0002"]
        assert out["scans"][1]["source"] == "3C279"
        assert out["scans"][0]["start_mjd"] == pytest.approx(57000 + 3600 / 86400, abs=1e-7)
        scan0 = [p for p in out["products"] if p["scan"] == 0]
        # 1 baseline x 2 frequencies x 2 polarisation products, then 2 stations x 2 frequencies
        assert [p["index"] for p in scan0] == list(range(8))
        assert [(p["telescope1"], p["telescope2"]) for p in scan0[:4]] == [("KP", "LA")] * 4
        assert [p["frequency"] for p in scan0[:4]] == [8400.99, 8400.99, 8416.99, 8416.99]
        assert [p["channels"] for p in scan0[:4]] == [32, 32, 32, 32]
        assert [p["pol_product"] for p in scan0[:4]] == [0, 1, 0, 1]
        assert [(p["telescope1"], p["autocorrelation"]) for p in scan0[4:]] == [
            ("KP", True), ("KP", True), ("LA", True), ("LA", True)]
        assert "monitor_server needs to be started" in out["messages"][0]
        assert (PacketId.START_DIFX_MONITOR, out["monitor"].to_bytes(4, "big")) in emu.received
        assert h.session.call("monitors") == [{"monitor": out["monitor"], "input": JOB, "requested": [], "count": 0}]
        h.session.call("monitor_stop", out["monitor"])
        assert h.session.call("monitors") == []

    def test_data_while_job_runs(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                                 channelled: bool) -> None:
        """Selected products stream while the job runs: spectra from monitor_data, delay/SNR as events."""
        emu, h = _rig(emulator, host, channelled, outcomes={"mon_1": "slow"})
        out = h.session.call("monitor_start", JOB, products=[0, 5], fft_size=128)
        assert out["selected"] == "data product requests sent to monitor_server"
        h.session.call("start_job", JOB)
        data = h.session.call("monitor_data", out["monitor"], 0, 10.0)
        data = h.session.call("monitor_data", out["monitor"], data["count"] + 1, 10.0)
        blocks = {b["product"]: b for b in data["blocks"]}
        assert sorted(blocks) == [0, 5]
        b0 = blocks[0]
        assert (b0["scan"], b0["source"], b0["integration"]) == ("No0001", "3C273", 2)
        assert len(b0["amplitude"]) == len(b0["mean_phase"]) == 32 and len(b0["lags"]) == 128
        assert b0["delay"] == pytest.approx(1 / (2 * 16.0) * (32 / 128), rel=1e-5)
        assert (b0["snr"], blocks[5]["snr"], b0["max_channel"]) == (10.0, 15.0, 1)
        ev = h.rec.wait_for(lambda evs: next((e for e in evs if isinstance(e, AttributeChanged)
                                              and e.kind == "monitor" and e.name == "product5.snr"), None),
                            10, "product5.snr event")
        assert (ev.key, ev.value) == ("mon_1", 15.0)
        h.session.call("monitor_stop", out["monitor"])
        if channelled:  # the CLOSE_CONNECTION went out on the monitor's channel
            close = out["monitor"].to_bytes(4, "big") + mx.encode_close()
            wait_for(lambda: (PacketId.CHANNEL_DATA, close) in emu.received, 10, "CLOSE_CONNECTION")
        h.session.call("stop_job", "mon_1")

    def test_bad_input(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                       channelled: bool) -> None:
        """An .input the parser cannot read: the monitor's ERROR is raised and published; it ends."""
        emu, h = _rig(emulator, host, channelled)
        emu.real("/data/exp/bad.input").write_text("# nothing\n")
        with pytest.raises(BackendRejected, match=r"problem parsing input file /data/exp/bad\.input"):
            h.session.call("monitor_start", "/data/exp/bad.input")
        line = h.rec.wait_for(lambda evs: next((e for e in evs if isinstance(e, LogLine)
                                                and e.stream == "monitor" and e.level == "error"), None), 10)
        assert line.key == "bad"
        assert h.session.call("monitors") == []


@pytest.mark.timeout(60)
class TestMonitorChecks:
    def test_refused(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """Unknown products, odd FFT sizes, unknown monitors and paths outside allowed-dirs are refused."""
        emu, h = _rig(emulator, host)
        with pytest.raises(BackendRejected, match="allowed"):
            h.session.call("monitor_start", "/etc/x.input")
        with pytest.raises(BackendRejected, match=r"not a \.input"):
            h.session.call("monitor_start", "/data/exp/mon_1.calc")
        mon = h.session.call("monitor_start", JOB)["monitor"]
        sent = len(emu.received)
        with pytest.raises(BackendRejected, match=r"no product \[8\]"):
            h.session.call("monitor_select", mon, [0, 8])
        with pytest.raises(BackendRejected, match="fft_size"):
            h.session.call("monitor_select", mon, [0], 63)
        with pytest.raises(BackendRejected, match="no real-time monitor 1"):
            h.session.call("monitor_data", 1)
        assert len(emu.received) == sent  # nothing was sent for any of them
        with pytest.raises(BackendRejected, match="fft_size"):
            h.session.call("monitor_start", JOB, products=[0], fft_size=3)
        assert [m["monitor"] for m in h.session.call("monitors")] == [mon]
        with pytest.raises(BackendRejected, match=r"no product \[99\]"):
            h.session.call("monitor_start", JOB, products=[99])
        assert [m["monitor"] for m in h.session.call("monitors")] == [mon]  # the refused one was stopped

    def test_times_out_after_job(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """After the job ends the source's data thread times out with a WARNING (published)."""
        _emu, h = _rig(emulator, host, outcomes={"mon_1": "slow"}, slow_ticks=30)
        mon = h.session.call("monitor_start", JOB, products=[1])["monitor"]
        h.session.call("start_job", JOB, wait=True)
        h.rec.wait_for(lambda evs: next((e for e in evs if isinstance(e, LogLine) and e.stream == "monitor"
                                         and "timed out" in e.message), None), 10, "monitor time-out warning")
        assert h.session.call("monitors")[0]["monitor"] == mon

    def test_lost_with_the_connection(self, emulator: Callable[..., GuiserverEmulator],
                                      host: Callable[..., Host]) -> None:
        """A server crash ends the monitor: a waiting monitor_data raises BackendUnavailable naming
        the sub-stream; after the reconnect no monitor is left and its id is refused."""
        emu, h = _rig(emulator, host)
        mon = h.session.call("monitor_start", JOB, products=[0])["monitor"]
        raised: list[BaseException] = []

        def wait_data() -> None:
            try:
                h.session.call("monitor_data", mon, 0, 20.0)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                raised.append(exc)

        waiter = threading.Thread(target=wait_data)
        waiter.start()
        wait_for(lambda: h.session.call("monitors"), 10, "the monitor to be open")
        emu.crash()
        waiter.join(20)
        assert not waiter.is_alive()
        assert len(raised) == 1 and isinstance(raised[0], BackendUnavailable), raised
        assert f"sub-stream {mon}" in str(raised[0])
        h.rec.wait_for(lambda evs: len([e for e in evs if isinstance(e, Connected)]) >= 2 or None, 10, "reconnected")
        assert h.session.call("monitors") == []
        with pytest.raises(BackendRejected, match=f"no real-time monitor {mon}"):
            h.session.call("monitor_data", mon)
