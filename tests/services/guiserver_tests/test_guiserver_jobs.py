"""GuiserverSession against the emulator: jobs, vex2difx, machines definition, direct mode,
recovery after crashes, and garbage from the server.

Every test is bounded; waits are on a Condition fed by ``emit``, never sleeps.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from flowbus.schemas import (
    AttributeChanged,
    BackendRejected,
    BackendUnavailable,
    Connected,
    Disconnected,
    ErrorEvent,
    GuiserverSessionConfig,
    LogLine,
    Observed,
    RecoveryGaveUp,
    Resynced,
    State,
    StateChanged,
)
from flowbus.services.guiserver import GuiserverSession
from flowbus.services.guiserver.protocol import (
    PacketId,
    encode,
)
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.guiserver import (
    Host,
    emulator_fixture,  # noqa: F401 - provides the `emulator` fixture
    host_fixture,  # noqa: F401 - provides the `host` fixture
    job_host,
    roundtrip,
)
from support.recorder import Recorder


@pytest.mark.timeout(60)
class TestDirectMode:
    """Direct mode (20): guiServer connects back to a loopback listener per operation."""

    def test_operations(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """ls, jobs, job status and both transfers work over back-connections."""
        emu = emulator(outcomes={"bad": "failure"})
        for name in ("good", "bad"):
            emu.real(f"/data/exp/{name}.input").write_text("")
        h = host(emu.port, channelled=False)
        call = h.session.call
        assert call("ls", "/data/exp") == ["bad.input", "good.input"]
        assert call("start_job", "/data/exp/good.input", wait=True, timeout=10)["native"] == "ENDED_GRACEFULLY"
        assert call("start_job", "/data/exp/bad.input", wait=True, timeout=10)["state"] == "aborted"
        rows = {r["job"]: r["state"] for r in call("job_status", "/data/exp/*.input")}
        assert rows == {"good": "complete", "bad": "aborted"}
        assert call("send_file", "/data/exp/f.txt", b"hello\n") == 6
        assert call("get_file", "/data/exp/f.txt") == b"hello\n"
        assert [pid for pid, _ in emu.received[:3]] == [8, 13, 20]
        assert not any(pid == PacketId.CHANNEL_DATA for pid, _ in emu.received)


@pytest.mark.timeout(60)
class TestVex2Difx:
    """vex2difx + calc runs (docs/protocols/guiserver.md §5.6)."""

    @pytest.mark.parametrize("channelled", [True, False])
    def test_run(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                 channelled: bool) -> None:
        """New .input then .im paths are returned and published one by one, then the run completes."""
        emu = emulator()
        emu.real("/data/exp/exp.v2d").write_text("vex = exp.vex\n")
        h = host(emu.port, channelled=channelled)
        paths = h.session.call("vex2difx", "/data/exp", "exp.v2d")
        assert paths == ["/data/exp/exp_1.input", "/data/exp/exp_2.input", "/data/exp/exp_1.im", "/data/exp/exp_2.im"]
        files = [x.message for x in h.rec.of(LogLine, "vex2difx/exp.v2d") if x.stream == "vex2difx.file"]
        assert files == paths
        assert [(e.state, e.attrs) for e in h.rec.of(StateChanged, "vex2difx/exp.v2d")] == [
            (State.ACTIVE, {}), (State.COMPLETE, {"files": 4})]
        # "new" .calc files are those modified in or after the run's first second (the real server's
        # rule): exp_2.calc, written a moment ago, would count too, so it is made older first
        os.utime(emu.real("/data/exp/exp_2.calc"), (time.time() - 10, time.time() - 10))
        assert h.session.call("vex2difx", "/data/exp", "exp_1*", calc_only=True) == ["/data/exp/exp_1.im"]

    def test_not_blocking(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """wait=False returns at once; completion arrives as an event."""
        emu = emulator()
        emu.real("/data/exp/exp.v2d").write_text("")
        h = host(emu.port)
        assert h.session.call("vex2difx", "/data/exp", "exp.v2d", wait=False) is None
        final = h.rec.final("vex2difx/exp.v2d")
        assert final.attrs == {"files": 4}

    @pytest.mark.parametrize("name", ["../x.v2d", "a b.v2d", "x;id", "sub/x.v2d", "*.v2d"])
    def test_bad_names(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                       name: str) -> None:
        """File names with directories, globs or shell characters are refused."""
        h = host(emulator().port)
        with pytest.raises(BackendRejected):
            h.session.call("vex2difx", "/data/exp", name)


@pytest.mark.timeout(60)
class TestMachines:
    """Machines definition (docs/protocols/guiserver.md §5.7)."""

    def test_spec_example(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """The spec's observed example: files, contents and sub-packet sequence."""
        h = host(emulator().port)
        out = h.session.call("machines", "/data/exp/j.input", manager="hostA", datastreams=["hostB", "hostC"],
                             processes=["hostA"], threads=4)
        assert out["ok"] and out["machines_file"] == "/data/exp/j.machines"
        assert out["machines"].split() == ["hostA", "hostB", "hostC", "hostA"]
        assert out["threads"].splitlines() == ["NUMBER OF CORES:    1", "3"]
        assert out["packets"][:2] == ["STARTED", "PARAMETER_CHECK_IN_PROGRESS"] and out["packets"][-1] == "ENDED_GRACEFULLY"

    def test_no_processors(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """No process nodes: 107 then 100, ok is False."""
        h = host(emulator().port)
        out = h.session.call("machines", "/data/exp/j.input", processes=[])
        assert not out["ok"] and out["packets"][-2:] == ["FAILURE_NO_PROCESSORS", "TERMINATED"]

    def test_bad_node(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """Node names with shell characters are refused."""
        with pytest.raises(BackendRejected):
            host(emulator().port).session.call("machines", "/data/exp/j.input", manager="a;id")


@pytest.mark.timeout(60)
class TestJobs:
    """Scripted job outcomes give the lifecycle of docs/protocols/guiserver.md §5.1 as StateChanged events."""

    @pytest.mark.parametrize(("outcome", "function", "state", "native"), [
        ("good", "USNO", State.COMPLETE, "ENDED_GRACEFULLY"),
        ("warning", "USNO", State.COMPLETE, "ENDED_GRACEFULLY"),
        ("partial", "USNO", State.COMPLETE, "JOB_ENDED_WITH_ERRORS"),
        ("failure", "USNO", State.ABORTED, "JOB_FAILED"),
        ("no_tools", "USNO", State.ABORTED, "JOB_FAILED"),
        ("config_fail", "BAIL_ON_CONFIG_FAIL", State.ABORTED, "STOPPED_AFTER_CONFIG"),
        ("config_fail", "USNO", State.COMPLETE, "ENDED_GRACEFULLY"),
        ("good", "CONFIG_ONLY", State.COMPLETE, "STOPPED_AFTER_CONFIG"),
    ])
    def test_outcomes(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                      outcome: str, function: str, state: State, native: str) -> None:
        """Each outcome ends in the expected final state, reached through queued (and active when run)."""
        _emu, h, inp = job_host(emulator, host, outcomes={"job_1": outcome})
        result = h.session.call("start_job", inp, function=function, wait=True, timeout=10)
        assert (result["state"], result["native"]) == (state.value, native)
        states = [e.state for e in h.rec.states("job_1")]
        assert states[0] is State.QUEUED and states[-1] is state
        assert (State.ACTIVE in states) == (native not in ("STOPPED_AFTER_CONFIG",))
        assert all(e.observed is Observed.PUSH and e.attrs["input"] == inp for e in h.rec.of(StateChanged, "job_1"))

    def test_job_output_lines(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """Job stdout/stderr lines become LogLines (info/warning) keyed by job; progress reaches 100 %."""
        _emu, h, inp = job_host(emulator, host, outcomes={"job_1": "warning"})
        h.session.call("start_job", inp, wait=True, timeout=10)
        levels = {(x.level, x.message) for x in h.rec.of(LogLine, "job_1") if x.stream == "job"}
        assert ("warning", "WARNING: weak signal") in levels and ("info", "tick 1") in levels
        progress = [x.value for x in h.rec.of(AttributeChanged, "job_1") if x.kind == "progress"]
        assert progress and progress[-1] == 100.0

    def test_missing_input(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """A missing .input ends the job aborted (109, 100) with the server's error line."""
        h = host(emulator().port)
        result = h.session.call("start_job", "/data/exp/nothere.input", wait=True, timeout=10)
        assert (result["state"], result["detail"]) == ("aborted", "FAILURE_INPUTFILE_NOT_FOUND")
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.level == "error" and "not found" in x.message
                                     for x in e))

    def test_output_exists(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """Existing output without force aborts; with force the job runs."""
        emu, h, inp = job_host(emulator, host)
        emu.real("/data/exp/job_1.difx").mkdir()
        result = h.session.call("start_job", inp, wait=True, timeout=10)
        assert result["detail"] == "FAILURE_OUTPUT_EXISTS"
        assert h.session.call("start_job", inp, force=True, wait=True, timeout=10)["state"] == "complete"

    def test_silent_stream(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """A stream that stops without a terminal id is resolved by the silence timeout + job status."""
        emu = emulator(outcomes={"job_1": "silent"})
        emu.real("/data/exp/job_1.input").write_text("")
        h = host(emu.port, job_silence_timeout=0.3)
        h.session.call("start_job", "/data/exp/job_1.input")
        final = h.rec.final("job_1")
        assert (final.state, final.native, final.observed) == (State.ABORTED, "NO_DIFXLOG", Observed.RESYNC)

    def test_stop(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """A slow job stopped by stop_job ends cancelled."""
        _emu, h, inp = job_host(emulator, host, outcomes={"job_1": "slow"})
        h.session.call("start_job", inp)
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 2" for x in e))
        with pytest.raises(BackendRejected, match="already running"):
            h.session.call("start_job", inp)
        h.session.call("stop_job", "job_1")
        final = h.rec.final("job_1")
        assert (final.state, final.native) == (State.CANCELLED, "TERMINATED")
        assert h.session.call("jobs") == {"job_1": "cancelled"}

    def test_unknown_job(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """stop_job and wait_job of a job never started raise BackendRejected."""
        h = host(emulator().port)
        for op in ("stop_job", "wait_job"):
            with pytest.raises(BackendRejected, match="unknown job"):
                h.session.call(op, "nope")

    def test_job_status(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """job_status reads the last STATUS line of each .difxlog (105 when there is none)."""
        emu, h, inp = job_host(emulator, host)
        emu.real("/data/exp/other.input").write_text("")
        h.session.call("start_job", inp, wait=True, timeout=10)
        rows = {r["job"]: r for r in h.session.call("job_status", "/data/exp/*.input")}
        assert rows["job_1"]["state"] == "complete" and rows["job_1"]["native"] == "Done"
        assert len(rows["job_1"]["timestamp"]) == 24
        assert rows["other"]["state"] is None and rows["other"]["native"] == "NO_DIFXLOG"
        assert "STATUS Running" in emu.real("/data/exp/job_1.difxlog").read_text()


# -- recovery --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
class TestRecovery:
    """Lost connections are reported at once, re-established, and lost jobs resynced."""

    def test_crash_during_job_resyncs(self, emulator: Callable[..., GuiserverEmulator],
                                      host: Callable[..., Host]) -> None:
        """A crash mid-job (the server writes .difxlog only at job end, so it stays empty): Disconnected,
        Connected again, settings re-applied, and within that one resync the job is unknown with the
        reason; its status is never asked for again and wait_job returns at once."""
        emu, h, inp = job_host(emulator, host, outcomes={"job_1": "slow"})
        h.session.call("relay", False)
        h.session.call("start_job", inp)
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 1" for x in e))
        asked_before = sum(pid == PacketId.GET_JOB_STATUS for pid, _ in emu.received)  # start_job asks once
        emu.crash()
        h.rec.wait_for(lambda e: sum(isinstance(x, Resynced) for x in e) == 2)
        states = h.rec.states("job_1")
        last = states[-1]
        assert (last.state, last.observed, last.native, last.previous) == (
            State.UNKNOWN, Observed.RESYNC, "NO_STATUS", State.ACTIVE)
        assert "cannot be recovered" in last.detail and "connection closed by guiServer" in last.detail
        resynced = h.rec.of(Resynced)[-1]
        assert h.rec.index(last) < h.rec.index(resynced)  # within the reconnect's own resync
        assert emu.real("/data/exp/job_1.difxlog").read_text() == ""
        assert len(h.rec.of(Connected)) == 2
        relay_settings = [p for pid, p in emu.received if pid == PacketId.RELAY]
        assert relay_settings[-1] == b"\x00\x00\x00\x00"  # relay off survived the reconnect
        assert h.session._tx.orphans() == []  # nothing left to poll
        asked = sum(pid == PacketId.GET_JOB_STATUS for pid, _ in emu.received)
        assert h.session.call("wait_job", "job_1", timeout=2)["state"] == "unknown"
        assert h.session.call("jobs") == {"job_1": "unknown"}
        roundtrip(h)
        assert sum(pid == PacketId.GET_JOB_STATUS for pid, _ in emu.received) == asked == asked_before + 1

    def test_crash_resyncs_from_a_written_difxlog(self, emulator: Callable[..., GuiserverEmulator],
                                                   host: Callable[..., Host]) -> None:
        """Where the .difxlog does hold the job's end (an emulator writing it line by line), the
        resync after a crash reads the final state from it."""
        emu, h, inp = job_host(emulator, host, outcomes={"job_1": "slow"}, difxlog_live=True)
        h.session.call("start_job", inp)
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 1" for x in e))
        emu.crash()
        final = h.rec.final("job_1")
        assert (final.state, final.observed, final.native) == (State.COMPLETE, Observed.RESYNC, "Done")

    def test_rerun_after_unknown(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """A job lost in a crash can be started again; its new run is followed as usual."""
        emu, h, inp = job_host(emulator, host, outcomes={"job_1": "slow"})
        h.session.call("start_job", inp)
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 1" for x in e))
        emu.crash()
        h.rec.wait_for(lambda e: any(isinstance(x, StateChanged) and x.state is State.UNKNOWN for x in e))
        emu.outcomes["job_1"] = "good"
        result = h.session.call("start_job", inp, force=True, wait=True, timeout=10)
        assert (result["state"], result["native"]) == ("complete", "ENDED_GRACEFULLY")

    def test_rerun_crash_ignores_the_earlier_run(self, emulator: Callable[..., GuiserverEmulator],
                                                 host: Callable[..., Host]) -> None:
        """A re-run lost in a crash is unknown, not the earlier run's end still last in the appended .difxlog."""
        emu, h, inp = job_host(emulator, host)
        assert h.session.call("start_job", inp, wait=True, timeout=10)["state"] == "complete"
        assert "STATUS Done" in emu.real("/data/exp/job_1.difxlog").read_text()
        emu.outcomes["job_1"] = "slow"
        h.session.call("start_job", inp, force=True)
        h.rec.wait_for(lambda e: sum(isinstance(x, LogLine) and x.message == "tick 1" for x in e) == 2)  # the re-run's
        emu.crash()
        h.rec.wait_for(lambda e: sum(isinstance(x, Resynced) for x in e) == 2)
        last = h.rec.states("job_1")[-1]
        assert (last.state, last.native, last.observed) == (State.UNKNOWN, "NO_STATUS", Observed.RESYNC)

    def test_crash_after_job(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """The real server's crash after every job: the job completes, then the session reconnects."""
        _emu, h, inp = job_host(emulator, host, crash_after_job=True)
        assert h.session.call("start_job", inp, wait=True, timeout=10)["state"] == "complete"
        h.rec.wait_for(lambda e: sum(isinstance(x, Connected) for x in e) == 2)
        assert h.rec.of(Disconnected)[0].will_retry
        assert roundtrip(h) == ["job_1.difx", "job_1.difxlog", "job_1.input"]

    def test_resync_known_on_start(self, emulator: Callable[..., GuiserverEmulator],
                                   host: Callable[..., Host]) -> None:
        """A job the journal knows as active is resynced from its .difxlog at start()."""
        emu = emulator()
        emu.real("/data/exp/old.input").write_text("")
        emu.real("/data/exp/old.difxlog").write_text(
            "Sun Nov 22 01:43:44 2026   0 node1  STATUS Running  old 10%\n"
            "Sun Nov 22 01:43:50 2026   0 node1  STATUS Done  old done\n")
        known = {"old": StateChanged(source="gs", backend="guiserver", key="old", state=State.ACTIVE,
                                     attrs={"input": "/data/exp/old.input"})}
        rec = Recorder()
        session = GuiserverSession(GuiserverSessionConfig(name="gs", port=emu.port))
        session.start(rec, known)
        try:
            final = rec.final("old")
            assert (final.state, final.observed, final.previous) == (State.COMPLETE, Observed.RESYNC, State.ACTIVE)
        finally:
            session.stop()

    def test_quiet_orphan_backs_off(self, emulator: Callable[..., GuiserverEmulator]) -> None:
        """A job known from the journal whose .difxlog stays empty is asked for less and less often
        (1 s, 2 s, 4 s, ... at most a minute), not every second forever."""
        emu = emulator()
        emu.real("/data/exp/old.input").write_text("")
        emu.real("/data/exp/old.difxlog").write_text("")
        known = {"old": StateChanged(source="gs", backend="guiserver", key="old", state=State.ACTIVE,
                                     attrs={"input": "/data/exp/old.input"})}
        session = GuiserverSession(GuiserverSessionConfig(name="gs", port=emu.port, allowed_dirs=["/data"]))
        session.start(Recorder(), known)  # no poller: polls are driven below
        try:
            track = session._tx.job("old")
            assert track is not None and track.orphan and track.poll_every == 1.0

            def asked() -> int:
                return sum(pid == PacketId.GET_JOB_STATUS for pid, _ in emu.received)

            for gap in (2.0, 4.0, 8.0):
                count = asked()
                session.poll()  # not due yet: nothing is sent
                assert asked() == count
                track.next_poll = session._next_resync = 0.0  # make it due
                session.poll()
                assert asked() == count + 1 and track.poll_every == gap
        finally:
            session.stop()

    def test_disconnect_during_job(self, emulator: Callable[..., GuiserverEmulator],
                                   host: Callable[..., Host]) -> None:
        """A client that vanishes mid-job crashes the (emulated) server; another session reconnects."""
        emu, h, inp = job_host(emulator, host, outcomes={"job_1": "slow"}, crash_on_disconnect=True)
        other = host(emu.port)
        h.session.call("start_job", inp)
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 1" for x in e))
        h.session.kill()
        assert emu.crashed.wait(10)
        other.rec.wait_for(lambda e: sum(isinstance(x, Connected) for x in e) == 2)

    def test_not_connected(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """While the server is down operations raise BackendUnavailable."""
        emu = emulator(restart_delay=30.0)
        h = host(emu.port)
        emu.crash()
        h.rec.wait_for(lambda e: any(isinstance(x, Disconnected) for x in e))
        with pytest.raises(BackendUnavailable, match="session 'gs' is disconnected"):
            h.session.call("mkdir", "/data/exp/x")
        assert h.session.call("jobs") == {}  # the session's own bookkeeping stays readable

    def test_gives_up(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """With reconnect-attempts set, a server that stays away ends the session: RecoveryGaveUp,
        phase dead, and calls say the session gave up."""
        emu = emulator(restart_delay=30.0)
        h = host(emu.port, reconnect_attempts=2)
        emu.crash()
        gave = h.rec.wait_for(lambda e: next((x for x in e if isinstance(x, RecoveryGaveUp)), None))
        assert gave.attempts == 2 and h.session.phase == "dead"
        assert [d.will_retry for d in h.rec.of(Disconnected)] == [True]
        with pytest.raises(BackendUnavailable, match="session 'gs' gave up reconnecting"):
            h.session.call("ls", "/data/exp")

    def test_start_without_server(self, emulator: Callable[..., GuiserverEmulator]) -> None:
        """start() against a closed port returns with the session down (Disconnected, will retry),
        calls name the session; once a guiServer listens there, the session connects by itself."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        session = GuiserverSession(GuiserverSessionConfig(name="x", port=port, request_timeout=1.0,
                                                          allowed_dirs=["/data"], reconnect_backoff=0.05))
        h = Host(session, Recorder()).start()
        try:
            assert session.phase == "down"
            down = h.rec.of(Disconnected)
            assert len(down) == 1 and down[0].will_retry and "connect" in down[0].reason, h.rec.events
            assert not h.rec.of(Connected)
            with pytest.raises(BackendUnavailable, match="session 'x' is disconnected"):
                session.call("ls", "/data")
            emulator(port=port)
            h.rec.wait_for(lambda e: any(isinstance(x, Resynced) for x in e))
            assert [type(x) for x in h.rec.events if isinstance(x, Connected | Resynced)] == [Connected, Resynced]
            assert session.phase == "up" and roundtrip(h) == []
        finally:
            h.close()


class _BadServer:
    """A server that answers the handshake, then sends ``garbage`` once (first connection only)."""

    def __init__(self, garbage: bytes) -> None:
        self.garbage, self.connections = garbage, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                conn.recv(8)
                conn.sendall(encode(8, b"bad") + encode(11, b"/b") + encode(18))
                self.connections += 1
                if self.connections == 1:
                    conn.recv(65536)  # the setup path: the handshake is over
                    conn.sendall(self.garbage)
        except OSError:
            return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.thread.join(5)


@pytest.mark.timeout(60)
class TestBadServer:
    """Garbage from the server is a protocol-error event; the connection is reset and re-established."""

    @pytest.mark.parametrize("garbage", [
        b"\x00\x00\x00\x04\xff\xff\xff\xf0",  # negative length
        b"\x00\x00\x00\x04\x7f\x00\x00\x00",  # huge length
        encode(22, b"\x00\x00\x00\x09abcd"),  # channel data nobody asked for
    ])
    def test_protocol_error(self, host: Callable[..., Host], garbage: bytes) -> None:
        """ErrorEvent, Disconnected, then Connected again; the process keeps running."""
        server = _BadServer(garbage)
        h = host(server.port, max_packet=1 << 20)
        try:
            err = h.rec.wait_for(lambda e: next((x for x in e if isinstance(x, ErrorEvent)), None))
            assert err.error_type.endswith("BackendProtocolError")
            h.rec.wait_for(lambda e: sum(isinstance(x, Connected) for x in e) == 2)
            assert "protocol error" in h.rec.of(Disconnected)[0].reason
        finally:
            h.close()
            server.close()


@pytest.mark.timeout(60)
class TestLifecycle:
    """start/stop/kill contracts of BackendSession."""

    def test_stop_and_kill_idempotent(self, emulator: Callable[..., GuiserverEmulator],
                                      host: Callable[..., Host]) -> None:
        """stop() publishes one final Disconnected; kill() and a second stop() are silent no-ops."""
        h = host(emulator().port)
        h.session.stop()
        h.session.stop()
        h.session.kill()
        assert [d.will_retry for d in h.rec.of(Disconnected)] == [False]

    def test_start_twice(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """A second start() is refused."""
        h = host(emulator().port)
        with pytest.raises(BackendRejected, match="already started"):
            h.session.start(Recorder(), {})

    @pytest.mark.parametrize("channelled", [True, False])
    @pytest.mark.parametrize("end", ["stop", "release"])
    def test_no_thread_left(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                            channelled: bool, end: str) -> None:
        """stop() and release() during a running job leave no thread of the session: the reader,
        the job's back-connection (direct mode) and a background vex2difx run are joined."""
        emu = emulator(outcomes={"job_1": "slow"})
        emu.real("/data/exp/job_1.input").write_text("")
        emu.real("/data/exp/exp.v2d").write_text("")
        h = host(emu.port, channelled=channelled)
        h.session.call("start_job", "/data/exp/job_1.input")
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 2" for x in e))
        assert h.session.call("vex2difx", "/data/exp", "exp.v2d", wait=False) is None

        def ours() -> list[str]:
            return [t.name for t in threading.enumerate() if t.name.startswith("guiserver-gs-")]

        assert "guiserver-gs-reader" in ours()
        assert any(n.startswith("guiserver-gs-direct-") for n in ours()) == (not channelled)
        getattr(h.session, end)()
        assert ours() == []
        assert h.session.phase == "closed"

    def test_kill_logs_nothing(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """kill() closes the connection without raising or logging a failure."""
        from structlog.testing import capture_logs

        h = host(emulator().port)
        with capture_logs() as logs:
            h.session.kill()
        assert not [entry for entry in logs if entry["event"] == "session.kill.failed"]
        with pytest.raises(BackendUnavailable):
            h.session.call("mkdir", "/data/exp/x")
