"""A real guiServer built from DiFX's source (``FLOWBUS_GUISERVER_BIN``, docs/backends/guiserver.md
"Checked against a real guiServer") next to the emulator: the same requests give the same events,
word for word. Skipped when ``FLOWBUS_GUISERVER_BIN`` is unset.

The real server runs DiFX tools; here they are the stand-ins of :mod:`support.gs_tools`, which
print what the emulator's fake jobs print. What the server itself says (``executing: ...``,
``mpifxcorr complete``, ``... FAILED``) must then be the same on both.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import pytest

from flowbus.schemas import AttributeChanged, Disconnected, LogLine, Observed, Resynced, State, StateChanged
from flowbus.services.guiserver import messages as gx
from flowbus.services.guiserver.protocol import Connection, ConnState, PacketId, StreamKind, encode
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.guiserver import (
    Host,
    RealServer,
    _loopback_only,
    emulator_fixture,  # noqa: F401 - provides the `emulator` fixture
    host_fixture,  # noqa: F401 - provides the `host` fixture
    real_server_fixture,  # noqa: F401 - provides the `real_server` fixture
    roundtrip,
    wait_for,
)

#: (job outcome, DifxStart function)
SCENARIOS = [("good", "USNO"), ("warning", "USNO"), ("failure", "USNO"), ("partial", "USNO"),
             ("config_fail", "BAIL_ON_CONFIG_FAIL"), ("config_fail", "USNO"), ("good", "CONFIG_ONLY")]


def _job(h: Host, d: str, name: str, function: str, setup: str) -> tuple[str, list[tuple[str, str, str]]]:
    """Run job ``name`` to its end; its final state and every log line, paths made comparable."""
    final = h.session.call("start_job", f"{d}/{name}.input", function=function, wait=True, timeout=30)
    state = final["state"] if isinstance(final, dict) else str(final)
    lines = []
    for e in h.rec.of(LogLine):
        text = e.message.replace(setup, "<setup>").replace(d, "<dir>")
        lines.append((e.level, e.stream, text))
    return state, lines


def _both(emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
          real_server: Callable[..., RealServer], outcome: str, job: bool = True,
          **config: str) -> tuple[Host, str, Host, str]:
    """An emulator and a real server, each with ``job_1.input`` (unless not ``job``), and a session on each."""
    emu = emulator(outcomes={"job_1": outcome})
    srv = real_server(outcomes={"job_1": outcome})
    if job:
        emu.real("/data/exp/job_1.input").write_text("# fake\n")
        (srv.data / "job_1.input").write_text("# fake\n")
    he = host(emu.port, **config)
    hr = host(srv.port, allowed_dirs=[str(srv.root)], **config)
    return he, "/data/exp", hr, str(srv.data)


def _ready(s: socket.socket, conn: Connection) -> bool:
    """Read what is there; whether the handshake is complete (re-asks while nothing came back)."""
    s.settimeout(0.5)
    try:
        data = s.recv(65536)
    except TimeoutError:
        s.sendall(conn.again())  # the real server may have lost the first request
        return False
    conn.receive(data)
    return conn.state is ConnState.READY


@pytest.mark.timeout(120)
class TestSameAsEmulator:
    """What a real guiServer says about a job is what the emulator says."""

    @pytest.mark.parametrize(("outcome", "function"), SCENARIOS)
    def test_job(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                 real_server: Callable[..., RealServer], outcome: str, function: str) -> None:
        """Final state and every log line (server texts, job output) match word for word; only
        the order of lines of different pipes may differ (the server reads them in two threads)."""
        he, de, hr, dr = _both(emulator, host, real_server, outcome)
        state_e, lines_e = _job(he, de, "job_1", function, he.session.setup_path)
        state_r, lines_r = _job(hr, dr, "job_1", function, hr.session.setup_path)
        assert state_r == state_e
        assert sorted(lines_r) == sorted(lines_e)

    def test_missing_input(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                           real_server: Callable[..., RealServer]) -> None:
        """A job whose .input does not exist: the same state and text."""
        he, de, hr, dr = _both(emulator, host, real_server, "good")
        assert (_job(he, de, "nosuch", "USNO", he.session.setup_path)
                == _job(hr, dr, "nosuch", "USNO", hr.session.setup_path))


    @pytest.mark.parametrize("present", [True, False])
    def test_vex2difx(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                      real_server: Callable[..., RealServer], present: bool) -> None:
        """vex2difx then calc (and a .v2d that is missing): the same new files, the same texts."""
        he, de, hr, dr = _both(emulator, host, real_server, "good", job=False)
        results = []
        for h, d in ((he, de), (hr, dr)):
            if present:
                h.session.call("send_file", f"{d}/exp.v2d", b"vex = exp.vex\n")
            paths = h.session.call("vex2difx", d, "exp.v2d")
            lines = sorted((e.level, e.message.replace(h.session.setup_path, "<setup>").replace(d, "<dir>"))
                           for e in h.rec.of(LogLine) if e.stream == "server")
            results.append(([p.replace(d, "<dir>") for p in paths], lines))
        assert results[1] == results[0]
        if present:
            assert results[0][0] == ["<dir>/exp_1.input", "<dir>/exp_2.input", "<dir>/exp_1.im", "<dir>/exp_2.im"]


    @pytest.mark.parametrize("processes", [["hostA"], []])
    def test_machines(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                      real_server: Callable[..., RealServer], processes: list[str]) -> None:
        """A machines definition: the same sub-packets, files, contents and server texts (and the
        same refusal without process nodes)."""
        he, de, hr, dr = _both(emulator, host, real_server, "good")
        results = []
        for h, d in ((he, de), (hr, dr)):
            out = h.session.call("machines", f"{d}/job_1.input", manager="hostA", datastreams=["hostB", "hostC"],
                                 processes=processes, threads=4)
            out["log"] = [(e.level, e.message) for e in h.rec.of(LogLine) if e.stream == "server"]
            results.append({k: v.replace(d, "<dir>") if isinstance(v, str) else v for k, v in out.items()})
        assert results[1] == results[0]


@pytest.mark.timeout(120)
class TestRealServer:
    """Behaviour of the real server that the session must survive."""

    def test_listing_formats(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                             real_server: Callable[..., RealServer]) -> None:
        """ls returns bare names, ls -l long lines without ``total``: the same on both."""
        he, de, hr, dr = _both(emulator, host, real_server, "good")
        for h, d in ((he, de), (hr, dr)):
            h.session.call("mkdir", f"{d}/sub")
            h.session.call("touch", f"{d}/sub/a.txt")
        assert roundtrip(hr, f"{dr}/sub") == roundtrip(he, f"{de}/sub") == ["a.txt"]
        long_e = he.session.call("ls", f"{de}/sub", "-l")
        long_r = hr.session.call("ls", f"{dr}/sub", "-l")
        assert long_r[0] == long_e[0] == "total 0"
        assert [x.split()[-1] for x in long_r[1:]] == [x.split()[-1] for x in long_e[1:]] == ["a.txt"]
        assert [x.split()[0] for x in long_r[1:]] == [x.split()[0] for x in long_e[1:]]

    def test_first_packet_loss_survived(self, real_server: Callable[..., RealServer],
                                        host: Callable[..., Host]) -> None:
        """The real server loses the first packet of about one connection in ten; twenty
        sessions in a row all connect (the handshake resends its version request). (No ls here:
        a client that disconnects right after an ls can crash the real server, see the docs.)"""
        srv = real_server()
        for _ in range(20):
            h = host(srv.port, allowed_dirs=[str(srv.root)])
            info = h.session.call("version")
            assert info["version"] == "DEVELr7531" and isinstance(info["environment"], int)
            h.close()
        assert srv.alive

    def test_frozen_server(self, real_server: Callable[..., RealServer], host: Callable[..., Host]) -> None:
        """A SIGSTOPped real server: Disconnected within request-timeout + 2 s (+ polls)."""
        import os
        import signal
        import time

        srv = real_server()
        h = host(srv.port, allowed_dirs=[str(srv.root)], request_timeout=1.0)
        roundtrip(h, str(srv.data))
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            gone = h.rec.wait_for(lambda e: next((x for x in e if isinstance(x, Disconnected)), None), 10,
                                  "Disconnected after SIGSTOP")
            assert time.monotonic() - t0 < 1.0 + 2.0 + 1.5  # request-timeout + 2 s + polls and scheduling
            assert "did not respond" in gone.reason.lower()
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)

    def test_calc_glob_kept_literally(self, real_server: Callable[..., RealServer]) -> None:
        """A calc-only run whose glob matches no .calc file makes the real server create files
        literally named ``exp_*.calc`` and ``exp_*.im`` (why the session refuses such a glob, and
        what the emulator reproduces). Sent on a bare connection: the session would refuse it."""
        srv = real_server()
        doc = gx.build("DifxVex2DifxRun", [("passPath", str(srv.data)), ("file", "exp_*"), ("calcOnly", 1),
                                           ("calcCommand", "calcif2"), ("port", 23456)])
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            conn = Connection()
            s.sendall(conn.start())
            wait_for(lambda: _ready(s, conn), 10, "the version reply")
            s.sendall(encode(PacketId.CHANNEL_ALL_DATA_ON))
            conn.expect(23456, StreamKind.RAW)
            s.sendall(encode(PacketId.COMMAND, doc))
            s.settimeout(10)
            while not conn.stream_done(23456):
                conn.receive(s.recv(65536))
        assert (srv.data / "exp_*.calc").exists() and (srv.data / "exp_*.im").read_text() == "fake model\n"

    def test_unknown_packet_ignored(self, real_server: Callable[..., RealServer]) -> None:
        """An unknown packet id is skipped and the stream stays in sync (docs/protocols/guiserver.md §2.2): the version
        request after it is answered."""
        srv = real_server()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            for _ in range(10):  # the first packet may be lost: ask until answered
                s.sendall(encode(999, b"??") + encode(PacketId.GUISERVER_VERSION))
                s.settimeout(0.5)
                try:
                    head = s.recv(8)
                except TimeoutError:
                    continue
                assert int.from_bytes(head[:4], "big") == PacketId.GUISERVER_VERSION
                break
            else:
                pytest.fail("no version reply")

    def test_state_events(self, real_server: Callable[..., RealServer], host: Callable[..., Host]) -> None:
        """A good job on the real server: active then complete, with its output as log lines."""
        srv = real_server()
        (srv.data / "job_1.input").write_text("# fake\n")
        h = host(srv.port, allowed_dirs=[str(srv.root)])
        h.session.call("start_job", f"{srv.data}/job_1.input", wait=True, timeout=30)
        states = [e.state.value for e in h.rec.of(StateChanged, "job_1")]
        assert "active" in states and states[-1] == "complete"
        assert any(re.fullmatch(r"tick \d", e.message) for e in h.rec.of(LogLine, "job_1"))


@pytest.mark.timeout(120)
class TestRealRecovery:
    """A real guiServer buffers a job's .difxlog until the job ends, so a crash loses it."""

    def test_difxlog_written_at_job_end(self, real_server: Callable[..., RealServer],
                                        host: Callable[..., Host]) -> None:
        """While a job runs its .difxlog exists and is empty although its status messages were
        relayed; the lines appear when the job ends (here: stopped)."""
        if not _loopback_only():
            pytest.skip("multicast relays need a loopback-only network namespace (scripts/dev.sh test)")
        srv = real_server(outcomes={"job_1": "slow"})
        (srv.data / "job_1.input").write_text("# fake\n")
        h = host(srv.port, allowed_dirs=[str(srv.root)])
        h.session.call("start_job", f"{srv.data}/job_1.input")
        h.rec.wait_for(lambda e: sum(isinstance(x, AttributeChanged) and x.key == "job_1" for x in e) >= 3 or None,
                       30, "three relayed progress updates of job_1")
        log = srv.data / "job_1.difxlog"
        assert log.exists() and log.read_text() == ""
        h.session.call("stop_job", "job_1")
        assert h.rec.final("job_1", timeout=30).state is State.CANCELLED
        wait_for(lambda: "STATUS Running" in log.read_text(), 10, "job_1.difxlog written at the job's end")

    def test_crash_during_job_unknown(self, real_server: Callable[..., RealServer],
                                      host: Callable[..., Host]) -> None:
        """The real server killed mid-job and started again: the job's status is NO_STATUS (its
        .difxlog was never written), so within the reconnect's resync it becomes unknown with
        the reason, and its status is not asked for again."""
        srv = real_server(outcomes={"job_1": "slow"})
        (srv.data / "job_1.input").write_text("# fake\n")
        h = host(srv.port, allowed_dirs=[str(srv.root)])
        h.session.call("start_job", f"{srv.data}/job_1.input")
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 1" for x in e), 30, "tick 1")
        srv.crash()
        h.rec.wait_for(lambda e: any(isinstance(x, Disconnected) for x in e), 10, "Disconnected")
        srv.restart()
        h.rec.wait_for(lambda e: sum(isinstance(x, Resynced) for x in e) == 2 or None, 30, "the second Resynced")
        last = h.rec.states("job_1")[-1]
        assert (last.state, last.observed, last.native) == (State.UNKNOWN, Observed.RESYNC, "NO_STATUS")
        assert "cannot be recovered" in last.detail
        assert h.rec.index(last) < h.rec.index(h.rec.of(Resynced)[-1])
        assert h.session._tx.orphans() == []
        assert h.session.call("wait_job", "job_1", timeout=2)["state"] == "unknown"
