"""GuiserverSession conformance suite: handshake, files, transfers, relay, security.

Runs against the emulator (and a real guiServer when
``FLOWBUS_GUISERVER=host:port`` is set, with ``FLOWBUS_GUISERVER_DIR`` a scratch directory on it).

Every test is bounded; waits are on a Condition fed by ``emit``, never sleeps.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

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
    State,
    StateChanged,
    UnknownOperation,
)
from flowbus.services import BackendSession
from flowbus.services.guiserver import GuiserverSession
from flowbus.services.guiserver import messages as gx
from flowbus.services.guiserver.protocol import (
    JOB_TERMINAL,
    FrameDecoder,
    Packet,
    PacketId,
    decode_int,
    encode,
)
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.guiserver import (
    Host,
    emulator_fixture,  # noqa: F401 - provides the `emulator` fixture
    host_fixture,  # noqa: F401 - provides the `host` fixture
    real_server_fixture,  # noqa: F401 - provides the `real_server` fixture
    roundtrip,
    target_fixture,  # noqa: F401 - provides the `target` fixture
    wait_for,
)
from support.recorder import Recorder

# -- conformance (emulator and real server) ----------------------------------------------------------


@pytest.mark.timeout(60)
class TestHandshake:
    """Version handshake first, then the setup path, channel mode and relay settings."""

    def test_connected_and_version(self, target: tuple[Host, str]) -> None:
        """start() publishes Connected and version() reports the reply of docs/protocols/guiserver.md §3.2."""
        h, _ = target
        assert isinstance(h.session, BackendSession)
        assert h.rec.of(Connected)
        info = h.session.call("version")
        assert info["version"] and info["setup_path"].endswith("rungeneric.DIFX-DEVEL")

    def test_packet_order(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """The first packet is the version request; 13, 19, 1, 17 follow before any command."""
        emu = emulator()
        h = host(emu.port)
        roundtrip(h)
        ids = [pid for pid, _ in emu.received]
        assert ids[:5] == [8, 13, 19, 1, 17]
        assert emu.received[1][1] == b"/opt/difx/bin/rungeneric.DIFX-DEVEL"

    def test_startup_race_is_avoided(self, emulator: Callable[..., GuiserverEmulator],
                                     host: Callable[..., Host]) -> None:
        """With the server's start-up race on, channelled mode still works (19 is sent after 18)."""
        h = host(emulator(startup_race=True).port)
        h.session.call("touch", "/data/exp/x.input")
        assert roundtrip(h) == ["x.input"]

    def test_lost_first_packet_resent(self, emulator: Callable[..., GuiserverEmulator],
                                      host: Callable[..., Host]) -> None:
        """A real guiServer loses the first packet of about one connection in ten (checked against
        a real build, docs/backends/guiserver.md): the version request is sent again every 0.5 s
        until the server answers."""
        emu = emulator(startup_race=True)
        h = host(emu.port)
        assert roundtrip(h) == []
        assert [pid for pid, _ in emu.received][:2] == [8, 8]

    def test_frozen_server_disconnected(self, emulator: Callable[..., GuiserverEmulator],
                                        host: Callable[..., Host]) -> None:
        """A server that keeps the connection open but says nothing (SIGSTOP) gets a version
        request after 2 s of silence; no answer within request-timeout is Disconnected, found
        within request-timeout + 2 s (+ polls); after a thaw the session comes back."""
        emu = emulator()
        h = host(emu.port, request_timeout=1.0)
        roundtrip(h)
        before = len(emu.received)
        emu.freeze()
        t0 = time.monotonic()
        gone = h.rec.wait_for(lambda e: next((x for x in e if isinstance(x, Disconnected)), None), 10,
                              "Disconnected after the server froze")
        took = time.monotonic() - t0
        assert "did not respond" in gone.reason.lower()
        assert took < 1.0 + 2.0 + 1.5, took  # request-timeout + 2 s of silence + polls and scheduling
        emu.thaw()
        h.rec.wait_for(lambda e: sum(isinstance(x, Connected) for x in e) >= 2 or None, 10, "reconnected")
        assert (8, b"") in emu.received[before:]

    def test_probe_keeps_quiet_connection(self, emulator: Callable[..., GuiserverEmulator],
                                          host: Callable[..., Host]) -> None:
        """An idle server that answers the probe stays connected; the probe replies publish nothing."""
        emu = emulator()
        h = host(emu.port, request_timeout=1.0)
        roundtrip(h)
        n = len(h.rec.events)
        wait_for(lambda: sum(pid == 8 for pid, _ in emu.received) >= 3 or None, 10, "two probes")
        assert roundtrip(h) == []
        assert not h.rec.of(Disconnected)
        assert not [e for e in h.rec.events[n:] if isinstance(e, LogLine) and "DEVELr7531" in e.message]

    def test_operations_listed(self, target: tuple[Host, str]) -> None:
        """operations() names every call; unknown names raise UnknownOperation."""
        h, _ = target
        assert {"ls", "start_job", "stop_job", "job_status", "relay", "select"} <= set(h.session.operations())
        with pytest.raises(UnknownOperation):
            h.session.call("format_disk")

    def test_remote_host_refused(self) -> None:
        """A non-loopback host is refused unless allow-remote is set (guiServer is a remote shell)."""
        session = GuiserverSession(GuiserverSessionConfig(name="x", host="192.0.2.1"))
        with pytest.raises(BackendRejected, match="loopback"):
            session.start(Recorder(), {})


@pytest.mark.timeout(60)
class TestEmulatorWire:
    """The emulator chunks channelled data as the real server does (docs/protocols/guiserver.md §2.4)."""

    def test_job_chunking(self, emulator: Callable[..., GuiserverEmulator]) -> None:
        """Job sub-packets arrive as separate CHANNEL_DATA chunks: id (4), length (4), data (if any)."""
        emu = emulator()
        emu.real("/data/exp/j.input").write_text("")
        with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as s:
            s.sendall(encode(8))
            frames = FrameDecoder()
            got: list[Packet] = []
            while not any(p.id == 18 for p in got):
                got += frames.feed(s.recv(65536))
            doc = gx.build("DifxStart", [("input", "/data/exp/j.input"), ("function", "CONFIG_ONLY"), ("port", 77)],
                           [("manager", {"node": "h"}), ("datastream", {"nodes": "d"}), ("process", {"nodes": "p"})])
            s.sendall(encode(13, b"/x") + encode(19) + encode(3, doc))
            ids: list[int] = []
            expect, length = "id", 0
            while not ids or ids[-1] not in JOB_TERMINAL or expect != "id":
                for p in frames.feed(s.recv(65536)):
                    if p.id != 22:
                        continue
                    assert decode_int(p.payload) == 77
                    chunk = p.payload[4:]
                    if expect == "id":
                        assert len(chunk) == 4
                        ids.append(decode_int(chunk))
                        expect = "len"
                    elif expect == "len":
                        assert len(chunk) == 4
                        length = decode_int(chunk)
                        expect = "data" if length else "id"
                    else:
                        assert len(chunk) == length
                        expect = "id"
        assert ids == [102, 103, 127, 114, 114, 125, 128]


@pytest.mark.timeout(60)
class TestFileOps:
    """mkdir, touch, ls, mv, cp, rm, rmdir."""

    def test_file_operations(self, target: tuple[Host, str]) -> None:
        """Fire-and-forget operations take effect in order; ls of a directory returns its entry names."""
        h, d = target
        call = h.session.call
        call("mkdir", f"{d}/sub")
        call("touch", f"{d}/sub/a.txt")
        assert call("ls", f"{d}/sub") == ["a.txt"]
        call("cp", f"{d}/sub/a.txt", f"{d}/sub/b.txt")
        call("mv", f"{d}/sub/a.txt", f"{d}/sub/c.txt")
        assert call("ls", f"{d}/sub") == ["b.txt", "c.txt"]
        assert call("ls", f"{d}/sub/*.txt") == [f"{d}/sub/b.txt", f"{d}/sub/c.txt"]  # the shell's expansion
        call("rm", f"{d}/sub/*.txt")
        assert call("ls", f"{d}/sub") == []
        call("rmdir", f"{d}/sub")
        assert "sub" not in call("ls", d)

    def test_rm_recursive(self, target: tuple[Host, str]) -> None:
        """rm with -rf removes a directory tree."""
        h, d = target
        h.session.call("mkdir", f"{d}/tree/deep")
        h.session.call("touch", f"{d}/tree/deep/f")
        assert "tree" in h.session.call("ls", d)
        h.session.call("rm", f"{d}/tree", "-rf")
        assert "tree" not in h.session.call("ls", d)


@pytest.mark.timeout(60)
class TestTransfer:
    """getFile and sendFile (DifxFileTransfer, docs/protocols/guiserver.md §5.5)."""

    def test_text_roundtrip(self, target: tuple[Host, str]) -> None:
        """send_file then get_file gives the same bytes back."""
        h, d = target
        text = ("line %d\n" * 300 % tuple(range(300))).encode()
        assert h.session.call("send_file", f"{d}/t.txt", text) == len(text)
        assert h.session.call("get_file", f"{d}/t.txt") == text

    def test_binary_get(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """get_file is binary-safe on our side (1024-byte server chunks)."""
        emu = emulator()
        blob = bytes(range(256)) * 10 + b"\x00tail"
        emu.real("/data/exp/b.bin").write_bytes(blob)
        assert host(emu.port).session.call("get_file", "/data/exp/b.bin") == blob

    def test_get_missing(self, target: tuple[Host, str]) -> None:
        """A missing file is the server's -2, raised as BackendRejected."""
        h, d = target
        with pytest.raises(BackendRejected, match="does not exist"):
            h.session.call("get_file", f"{d}/missing.txt")

    def test_send_nul_refused(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """Data with NUL bytes is refused (the server would truncate it) unless allow_nul."""
        emu = emulator()
        h = host(emu.port)
        with pytest.raises(BackendRejected, match="NUL"):
            h.session.call("send_file", "/data/exp/n.bin", b"ab\x00cd")
        assert h.session.call("send_file", "/data/exp/n.bin", b"ab\x00cd", allow_nul=True) == 5
        assert emu.real("/data/exp/n.bin").read_bytes() == b"ab"  # the server's truncation, reproduced

    def test_send_missing_dir(self, target: tuple[Host, str]) -> None:
        """A destination whose directory is missing is the server's -2."""
        h, d = target
        with pytest.raises(BackendRejected, match="does not exist"):
            h.session.call("send_file", f"{d}/nodir/x.txt", b"x")


@pytest.mark.timeout(60)
class TestSecurity:
    """Unsafe paths and arguments are refused and nothing is sent."""

    @pytest.mark.parametrize(("op", "args"), [
        ("mkdir", ("relative/dir",)),
        ("mkdir", ("/data/exp/a;touch /tmp/x",)),
        ("touch", ("/data/exp/$(id)",)),
        ("touch", ("/data/exp/`id`",)),
        ("rm", ("/data/exp/a", "-rf /")),
        ("rm", ("/data/exp/a", "--no-preserve-root")),
        ("ls", ("/data/exp/a b",)),
        ("mv", ("/data/exp/a", "b")),
        ("cp", ("/data/exp/../../etc/passwd", "/data/exp/p")),
        ("touch", ("/etc/cron.d/evil",)),
        ("job_status", ("/data/exp/*.input | sh",)),
        ("start_job", ("/data/exp/a.input\n<x/>",)),
        ("start_job", ("/data/exp/a.v2d",)),
        ("select", (["ALL_MESSAGES", "X; rm"],)),
    ])
    def test_refused(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                     op: str, args: tuple[Any, ...]) -> None:
        """Each unsafe call raises BackendRejected and the server receives nothing."""
        emu = emulator()
        h = host(emu.port)
        roundtrip(h)
        before = len(emu.received)
        with pytest.raises(BackendRejected):
            h.session.call(op, *args)
        roundtrip(h)
        assert [pid for pid, _ in emu.received[before:]] == [PacketId.COMMAND]  # only the ls

    def test_bad_function(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """A DifxStart function outside the spec's list is refused."""
        h = host(emulator().port)
        with pytest.raises(BackendRejected, match="function"):
            h.session.call("start_job", "/data/exp/a.input", function="X; id")


# -- relay ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
class TestRelay:
    """Relayed DiFX messages become typed events; relay on/off and selection are honoured."""

    def test_status_and_progress(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """DifxStatusMessage -> StateChanged and AttributeChanged(kind=progress) keyed by job."""
        emu = emulator()
        h = host(emu.port)
        roundtrip(h)  # the server has handled our relay-on: what we inject now is relayed
        emu.inject(gx.status_message("other", "Running", "r", vis_mjd=60000.5, start_mjd=60000.0, stop_mjd=60001.0))
        ev = h.rec.wait_for(lambda e: next((x for x in e if isinstance(x, AttributeChanged)), None))
        assert (ev.key, ev.kind, ev.name, ev.value) == ("other", "progress", "percent", 50.0)
        assert [e.state for e in h.rec.states("other")] == [State.ACTIVE]

    def test_weights_load_diagnostic(self, emulator: Callable[..., GuiserverEmulator],
                                     host: Callable[..., Host]) -> None:
        """Weights, DifxLoadMessage and DifxDiagnosticMessage become AttributeChanged events."""
        emu = emulator()
        h = host(emu.port)
        roundtrip(h)  # the server has handled our relay-on: what we inject now is relayed
        emu.inject(gx.status_message("w", "Running", weights=[0.9, 0.25]))
        emu.inject(b"<difxMessage><header><from>n1</from><type>DifxLoadMessage</type></header><body><difxLoad>"
                   b"<cpuLoad>0.5</cpuLoad><nCore>8</nCore></difxLoad></body></difxMessage>")
        emu.inject(b"<difxMessage><header><identifier>w</identifier><type>DifxDiagnosticMessage</type></header>"
                   b"<body><difxDiagnostic><diagnosticType>DataConsumed</diagnosticType><bytes>1024</bytes>"
                   b"</difxDiagnostic></body></difxMessage>")
        h.rec.wait_for(lambda e: any(isinstance(x, AttributeChanged) and x.kind == "diagnostic" for x in e))
        got = {(x.key, x.kind, x.name, x.value) for x in h.rec.of(AttributeChanged)}
        assert {("w", "weight", "ant0", 0.9), ("w", "weight", "ant1", 0.25), ("n1", "load", "cpuLoad", 0.5),
                ("n1", "load", "nCore", 8), ("w", "diagnostic", "DataConsumed", 1024)} <= got

    def test_alert_levels(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """DifxAlertMessage -> LogLine with the severity's level."""
        emu = emulator()
        h = host(emu.port)
        roundtrip(h)  # the server has handled our relay-on: what we inject now is relayed
        emu.inject(gx.alert_message("j", "weak fringes", 3))
        line = h.rec.wait_for(lambda e: next((x for x in e if isinstance(x, LogLine) and x.stream == "alert"), None))
        assert (line.key, line.level, line.message) == ("j", "warning", "weak fringes")

    def test_relay_off(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """After relay(False) nothing is relayed."""
        emu = emulator()
        h = host(emu.port)
        h.session.call("relay", False)
        roundtrip(h)
        emu.inject(gx.alert_message("j", "hidden", 2))
        roundtrip(h)
        assert not [x for x in h.rec.of(LogLine) if x.stream == "alert"]

    def test_selection(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """SELECTED_MESSAGES + ALERT_MESSAGES lets alerts through and drops status messages."""
        emu = emulator()
        h = host(emu.port)
        h.session.call("select", ["SELECTED_MESSAGES", "ALERT_MESSAGES"])
        roundtrip(h)
        emu.inject(gx.status_message("j", "Running"))
        emu.inject(gx.alert_message("j", "seen", 2))
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "seen" for x in e))
        assert h.rec.of(StateChanged, "j") == []

    def test_invalid_xml(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """A non-XML relay is an ErrorEvent; the connection stays up."""
        emu = emulator()
        h = host(emu.port)
        roundtrip(h)  # the server has handled our relay-on: what we inject now is relayed
        emu.inject(b"this is not xml at all")
        err = h.rec.wait_for(lambda e: next((x for x in e if isinstance(x, ErrorEvent)), None))
        assert err.operation == "relay"
        assert roundtrip(h) == [] and not h.rec.of(Disconnected)

    def test_unknown_type_delivered_raw(self, emulator: Callable[..., GuiserverEmulator],
                                        host: Callable[..., Host]) -> None:
        """A message type without its own event is still delivered, raw, as a debug LogLine."""
        emu = emulator()
        h = host(emu.port)
        roundtrip(h)  # the server has handled our relay-on: what we inject now is relayed
        doc = b"<difxMessage><header><type>DifxSmartMessage</type></header><body><vsn>X</vsn></body></difxMessage>"
        emu.inject(doc)
        line = h.rec.wait_for(lambda e: next((x for x in e if isinstance(x, LogLine)
                                              and x.stream == "relay.DifxSmartMessage"), None))
        assert "<vsn>X</vsn>" in line.message


# -- release ---------------------------------------------------------------------------------------------


class _AdoptingHost(Host):
    """A host whose session starts from the journal's last events (a newer incarnation)."""

    def __init__(self, session: GuiserverSession, rec: Recorder, known: dict[str, Any]) -> None:
        super().__init__(session, rec)
        self.known = known

    def start(self) -> Host:
        self.session.start(self.rec, self.known)
        self._thread.start()
        return self


@pytest.mark.timeout(60)
class TestRelease:
    def test_release_leaves_the_job_to_the_next_session(self, emulator: Callable[..., GuiserverEmulator],
                                                        host: Callable[..., Host]) -> None:
        """release() closes the connection and publishes nothing; the job runs on in the server,
        and a new session that knows it as active follows it to its end."""
        from support.guiserver import job_host

        emu, h, inp = job_host(emulator, host, outcomes={"job_1": "slow"})
        h.session.call("start_job", inp)
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 2" for x in e))
        mark = len(h.rec.events)
        h.session.release()
        h.session.release()
        h.session.stop()
        deadline = time.monotonic() + 10
        while emu._clients and time.monotonic() < deadline:  # the server notices the closed connection
            time.sleep(0.02)
        assert not emu._clients, "the connection is still open"
        assert len(h.rec.events) == mark, h.rec.events[mark:]
        assert inp in emu._jobs and not emu._jobs[inp].stopped.is_set(), "release stopped the job"
        with pytest.raises(BackendUnavailable):
            h.session.call("ls", "/data/exp")
        known = {"job_1": h.rec.states("job_1")[-1]}
        assert known["job_1"].state is State.ACTIVE
        cfg = GuiserverSessionConfig(name="gs", port=emu.port, allowed_dirs=["/data"], reconnect_backoff=0.05)
        second = _AdoptingHost(GuiserverSession(cfg), Recorder(), known).start()
        try:
            assert second.rec.of(Connected)
            emu._jobs[inp].finish.set()  # the slow job ends by itself now
            final = second.rec.final("job_1", 20)
            assert (final.state, final.native) == (State.COMPLETE, "Done")  # relayed, or read from the .difxlog
        finally:
            second.close()
        assert len(h.rec.events) == mark
