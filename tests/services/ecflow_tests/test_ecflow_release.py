"""Clean release and the liveness probe against real ecflow_server processes: a released session
leaves no change handle on the server, a reconnect to the same server (same ECF_PID) drops the
handle the lost connection left, and a frozen server (SIGSTOP) is ``stuck`` (no client call, no
operation) before it is ``Disconnected``; counted with the server's own handle list."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from flowbus.schemas import BackendProtocolError, BackendTimeout, BackendUnavailable, Connected, Disconnected, State
from flowbus.services.ecflow._probe import Liveness, ReplyReader, frame, ping_request, probe
from support import ecflow as _fx
from support import silent as _silent
from support.ecflow import CLIENT_BIN, EcfServer, Running, reached, write_suite
from support.recorder import show
from support.silent import SilentServer

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session
silent_server = _silent.silent_server

Server = Callable[..., EcfServer]
Session = Callable[..., Running]


def handles_on_server(server: EcfServer) -> list[int]:
    """The handle numbers the server holds, as the ecflow_client command line lists them (the user
    column is printed only on a user's first line, so a number may be the first word)."""
    out = subprocess.run([CLIENT_BIN, "--host", "127.0.0.1", "--port", str(server.port), "--ch_suites"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    lines = out.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.split()[:3] == ["User", "handle", "suites"]), None)
    if start is None:
        return []
    found = []
    for line in lines[start:]:
        words = line.split()
        number = next((w for w in words[:2] if w.isdigit()), None)
        if number is not None:
            found.append(int(number))
    return sorted(found)


@pytest.fixture
def frozen() -> Iterator[Callable[[EcfServer], None]]:
    """SIGSTOP a server; every stopped one gets SIGCONT at teardown (before the server fixture ends it)."""
    stopped: list[int] = []

    def freeze(server: EcfServer) -> None:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        stopped.append(server.proc.pid)

    yield freeze
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class TestCleanRelease:
    """Every way a session ends or reconnects leaves the server holding only live handles."""

    @pytest.mark.timeout(60)
    def test_release_and_stop_drop_their_handles(self, ecf_server: Server, ecflow_session: Session) -> None:
        """Two sessions register a handle each (2 on the server); release() of one leaves 1, stop()
        of the other leaves 0; the server itself runs on."""
        server = ecf_server()
        first, second = ecflow_session(server.port), ecflow_session(server.port)
        first.call("load", write_suite(server, "h", "task t\n  defstatus complete\n", {}))
        a = first.call("ch_register", False, ["h"])
        b = second.call("ch_register", True, ["h"])
        assert handles_on_server(server) == sorted([a, b])
        first.pause()
        first.session.release()
        assert handles_on_server(server) == [b]
        second.pause()
        second.session.stop()
        assert handles_on_server(server) == []
        assert server.proc is not None and server.proc.poll() is None

    @pytest.mark.timeout(90)
    def test_frozen_server_is_stuck_then_disconnected_and_its_old_handle_dropped(
            self, ecf_server: Server, ecflow_session: Session, frozen: Callable[[EcfServer], None]) -> None:
        """SIGSTOP: the session reports stuck and refuses operations (no client call), then publishes
        Disconnected; after SIGCONT it reconnects to the same server, drops the handle the lost
        connection left there and registers one new handle (1 on the server, not 2)."""
        server = ecf_server()
        run = ecflow_session(server.port, request_timeout=1, probe_timeout=0.3)
        run.call("load", write_suite(server, "f", "task t\n  defstatus complete\n", {}))
        old = run.call("ch_register", False, ["f"])
        assert handles_on_server(server) == [old]
        mark = len(run.rec.events)
        frozen(server)
        run.rec.wait_for(lambda _es: run.session.stuck_for() is not None or None, 10, "stuck")
        with pytest.raises(BackendUnavailable, match="stuck"):
            run.call("suites")
        lost = run.rec.wait_for(lambda es: [e for e in es[mark:] if isinstance(e, Disconnected)], 10, "Disconnected")
        assert "stuck" in lost[0].reason and lost[0].will_retry, show(lost[0])
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGCONT)
        run.rec.wait_for(lambda es: [e for e in es[mark:] if isinstance(e, Connected)], 20, "reconnected")
        assert run.session.stuck_for() is None
        now = handles_on_server(server)
        assert len(now) == 1 and now == [run.call("client", "ch_handle")], now
        run.call("suspend", "/f/t")
        run.rec.wait_for(reached("/f/t", State.SUSPENDED), 10, "seen through the new handle")


class TestProbe:
    """The GIL-free ping speaks ecFlow's wire and names why a server is not answering."""

    @pytest.mark.timeout(30)
    def test_probe_verdicts(self, ecf_server: Server, silent_server: Callable[[], SilentServer]) -> None:
        """A real server answers; a silent one times out (stuck); a closed port is unavailable;
        Liveness says stuck, then raises once stuck past request-timeout, and waits the full
        probe timeout afterwards (a server that answers again is seen)."""
        server = ecf_server()
        assert probe("127.0.0.1", server.port, 2.0) < 2.0
        quiet = silent_server()
        with pytest.raises(BackendTimeout, match="stuck"):
            probe("127.0.0.1", quiet.port, 0.2)
        closed = server.port
        server.stop()
        with pytest.raises(BackendUnavailable):
            probe("127.0.0.1", closed, 0.5)
        live = Liveness("127.0.0.1", quiet.port, probe_timeout=0.1, request_timeout=0.3)
        assert live.check() is False and live.stuck_for() is not None
        with pytest.raises(BackendTimeout, match="stuck for"):
            while not live.check():
                pass
        with pytest.raises(BackendTimeout):
            live.check()
        assert live.next_poll(0.1) == 0.1

    def test_reply_reader_rejects_garbage(self) -> None:
        """A header that is not a hex length, a huge length, or a payload that is not an ecFlow reply
        is a BackendProtocolError; a reply split across reads is assembled."""
        with pytest.raises(BackendProtocolError, match="hex length"):
            ReplyReader().feed(b"HTTP/1.1 400")
        with pytest.raises(BackendProtocolError, match="exceeds"):
            ReplyReader().feed(b"ffffffff{}")
        with pytest.raises(BackendProtocolError, match="not an ecFlow reply"):
            ReplyReader().feed(frame(b'{"x": 1}'))
        reader = ReplyReader()
        whole = frame(b'{"22ServerToClientResponse": {}}')
        assert not reader.feed(whole[:5]) and not reader.feed(whole[5:12]) and reader.feed(whole[12:])
        assert reader.reply == {"22ServerToClientResponse": {}}
        assert ping_request("u", "h")[:8].strip() == f"{len(ping_request('u', 'h')) - 8:x}".encode()
