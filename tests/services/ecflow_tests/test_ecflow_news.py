"""ecFlow's NEWS request spoken on a socket of the session's own (services/ecflow/_news.py), against
real ecflow_server processes: its answers agree with the binding's ``news_local()``, a quiet poll
makes no client call at all, a change is found and synced, a server restarted between two polls
takes the full-sync path, and replies that are not an answer to NEWS are named errors."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowbus.demo import free_port
from flowbus.schemas import AttributeChanged, BackendProtocolError, BackendRejected, BackendTimeout, Disconnected
from flowbus.services.ecflow import _news
from flowbus.services.ecflow._news import (
    Marks,
    News,
    marks_from,
    news_of,
    news_request,
    read_marks,
    zombie_count,
    zombies_request,
)
from flowbus.services.ecflow._probe import Liveness, exchange, frame
from flowbus.services.ecflow._session import ZOMBIE_READ_INTERVAL
from support import ecflow as _fx
from support import silent as _silent
from support.ecflow import EcfServer, Running, write_suite
from support.poll import until
from support.silent import SilentServer

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session
silent_server = _silent.silent_server

Server = Callable[..., EcfServer]
Session = Callable[..., Running]


def ask(server: EcfServer, marks: Marks) -> News:
    """Our NEWS request, answered by the real server."""
    reply, _took = exchange("127.0.0.1", server.port, news_request("flowbus", "localhost", marks), 2.0, "news")
    return news_of(reply, f"127.0.0.1:{server.port}")


def label_suite(server: EcfServer, suite: str = "n") -> str:
    return write_suite(server, suite, "task t\n  defstatus complete\n  label info \"x\"\n", {})


class Counting:
    """A real ``ecflow.Client`` whose calls are counted by method name (instrumentation only: every
    call goes to the client)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)
        return counted


class TestNewsWire:
    """The request the session builds is the one the binding sends, and the server says the same."""

    @pytest.mark.timeout(60)
    def test_answers_agree_with_the_binding(self, ecf_server: Server) -> None:
        """No change: no news; a label altered: news (the binding agrees); synced: no news again;
        with a change handle the same; a handle the server does not know: do a full sync."""
        server = ecf_server()
        mutator = server.client()
        mutator.load(_fx.ecflow.Defs(str(_defs_file(server, label_suite(server)))))
        client = server.client()
        client.sync_local()
        marks = read_marks(client)
        assert marks.handle == 0 and marks.state_change > 0 and marks.modify_change > 0, marks
        assert ask(server, marks) is News.NO_NEWS
        assert client.news_local() is False
        mutator.alter("/n/t", "change", "label", "info", "y")
        assert ask(server, marks) is News.NEWS
        assert client.news_local() is True
        client.sync_local()
        assert list(client.changed_node_paths), "the sync found nothing"
        after = read_marks(client)
        assert after.state_change > marks.state_change
        assert ask(server, after) is News.NO_NEWS
        client.ch_register(False, ["n"])  # returns None; the handle is ch_handle()
        client.sync_local()
        held = read_marks(client)
        handle = held.handle
        assert handle == client.ch_handle() > 0
        assert ask(server, held) is News.NO_NEWS
        mutator.alter("/n/t", "change", "label", "info", "z")
        assert ask(server, held) is News.NEWS
        assert ask(server, Marks(handle + 1000, held.state_change, held.modify_change)) is News.DO_FULL_SYNC
        assert ask(server, Marks(0, 10**8, 10**8)) is News.DO_FULL_SYNC
        reply, _took = exchange("127.0.0.1", server.port, zombies_request("flowbus", "localhost"), 2.0, "zombie list")
        assert zombie_count(reply, "here") == len(client.zombie_get(0)) == 0

    def test_marks_from_the_printed_defs(self) -> None:
        """The change numbers come from the defs' first state line; absent numbers are 0."""
        head = b"#5.9.2\ndefs_state MIGRATE flag:message state_change:81 modify_change:7 cal_count:0\nedit X 'y'"
        assert marks_from(head, 3) == Marks(3, 81, 7)
        assert marks_from(b"#5.9.2\ndefs_state MIGRATE cal_count:0\n", 0) == Marks(0, 0, 0)
        client = _fx.ecflow.Client("127.0.0.1", "1")
        assert read_marks(client) == Marks(0, 0, 0)  # no defs yet: what news_local() sends too


class TestSessionPoll:
    """The session's poll asks NEWS itself and calls the client only when there is news."""

    @pytest.mark.timeout(60)
    def test_quiet_polls_make_no_client_call_and_a_change_is_synced(self, ecf_server: Server,
                                                                    ecflow_session: Session) -> None:
        """While nothing changes, polls make no client call at all (NEWS and the zombie list, empty,
        are asked on the session's own socket); a label change is synced and published."""
        server = ecf_server()
        run = ecflow_session(server.port, poll_interval=0.05)
        run.call("load", label_suite(server))
        run.rec.wait_for(lambda es: [e for e in es if isinstance(e, AttributeChanged) and e.key == "/n/t"], 10,
                         "the loaded suite")
        run.pause()
        counting = Counting(run.session._client)
        run.session._client = counting
        polls, since = len(run.polls), time.monotonic()
        run.resume()
        until(lambda: len(run.polls) >= polls + 10 and time.monotonic() >= since + 2.5 * ZOMBIE_READ_INTERVAL,
              10, "ten polls over two and a half zombie-read intervals")
        assert counting.calls == {}, counting.calls  # no news_local, sync_local nor zombie_get
        server.client().alter("/n/t", "change", "label", "info", "seen")
        run.rec.wait_for(lambda es: [e for e in es if isinstance(e, AttributeChanged) and e.value == "seen"], 10,
                         "the label change")
        assert counting.calls.get("sync_local", 0) >= 1 and "news_local" not in counting.calls, counting.calls
        assert not run.errors, run.errors

    @pytest.mark.timeout(60)
    def test_unreadable_marks_fall_back_to_syncing_every_poll(self, ecf_server: Server, ecflow_session: Session,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
        """When the client's change numbers cannot be read (the printing fails), the session stays
        up, logs why, and syncs on every poll: changes are still published."""
        def broken(defs: Any) -> bytes:
            raise OSError("no in-memory file here")

        monkeypatch.setattr(_news._PRINTER, "head", broken)
        server = ecf_server()
        run = ecflow_session(server.port, poll_interval=0.05)
        run.call("load", label_suite(server))
        server.client().alter("/n/t", "change", "label", "info", "still seen")
        run.rec.wait_for(lambda es: [e for e in es if isinstance(e, AttributeChanged) and e.value == "still seen"],
                         10, "the label change")
        assert run.session._marks is None and run.session.phase == "up" and not run.errors
        assert not [e for e in run.rec.events if isinstance(e, Disconnected)], "a local failure lost the server"

    @pytest.mark.timeout(90)
    def test_restart_between_polls_takes_the_full_sync_path(self, ecf_server: Server,
                                                            ecflow_session: Session) -> None:
        """A server killed and started again on its port (new ECF_PID) answers our NEWS with news
        (numbers it does not know); the sync is full, the session reports the restart and resyncs,
        and changes after it are seen."""
        server = ecf_server()
        run = ecflow_session(server.port, poll_interval=0.05)
        run.call("load", label_suite(server))
        run.call("checkpt")
        run.rec.wait_for(lambda es: [e for e in es if isinstance(e, AttributeChanged) and e.key == "/n/t"], 10,
                         "the loaded suite")
        run.pause()
        mark = len(run.rec.events)
        server.kill9()
        server.start()
        run.resume()
        lost = run.rec.wait_for(lambda es: [e for e in es[mark:] if isinstance(e, Disconnected)], 20, "restart seen")
        assert "restarted between polls" in lost[0].reason and lost[0].will_retry, lost[0]
        server.client().alter("/n/t", "change", "label", "info", "after")
        run.rec.wait_for(lambda es: [e for e in es[mark:] if isinstance(e, AttributeChanged) and e.value == "after"],
                         20, "a change after the restart")
        assert not run.errors, run.errors


_LIAR = """
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(64)
reply = bytes.fromhex(sys.argv[2])
print("listening", flush=True)
while True:
    c = ls.accept()[0]
    c.recv(65536)
    c.sendall(reply)
    c.close()
"""


@pytest.fixture
def liar() -> Iterator[Callable[[bytes], int]]:
    """Factory: a child process answering every connection with the given bytes; its port. All
    killed by PID at teardown."""
    made: list[subprocess.Popen[bytes]] = []

    def make(reply: bytes) -> int:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", _LIAR, str(port), reply.hex()], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        made.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"listening"
        return port

    yield make
    for proc in made:
        proc.kill()
        proc.wait(5)


def _reply(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"22ServerToClientResponse": {"stc_cmd_": {"polymorphic_name": name, "ptr_wrapper": {"data": data}}}}


class TestNewsErrors:
    """A reply that is not an answer to NEWS is a named error; a frozen server is stuck, then lost."""

    @pytest.mark.timeout(30)
    def test_garbage_and_oversized_replies(self, liar: Callable[[bytes], int]) -> None:
        """Not a hex header, a length past the limit, JSON that is no ecFlow reply: each a
        BackendProtocolError naming the server; a reply of the wrong command or an unknown news
        value too; the server's ErrorCmd is BackendRejected with its message."""
        request = news_request("u", "h", Marks())
        for reply, words in ((b"HTTP/1.1 400 Bad Request\r\n\r\n", "hex length"), (b"ffffffff{}", "exceeds"),
                             (frame(b'{"x": 1}'), "not an ecFlow reply")):
            port = liar(reply)
            with pytest.raises(BackendProtocolError, match=words) as info:
                exchange("127.0.0.1", port, request, 2.0, "news request")
            assert f"127.0.0.1:{port}" in str(info.value)
        with pytest.raises(BackendProtocolError, match="expected an SNewsCmd reply, got 'SSyncCmd'"):
            news_of(_reply("SSyncCmd", {}), "here")
        with pytest.raises(BackendProtocolError, match="news_ 7"):
            news_of(_reply("SNewsCmd", {"news_": 7}), "here")
        with pytest.raises(BackendRejected, match="refused: no such user"):
            news_of(_reply("ErrorCmd", {"error_msg_": "no such user"}), "here")
        assert news_of(_reply("SNewsCmd", {"news_": 2}), "here") is News.DO_FULL_SYNC
        with pytest.raises(BackendProtocolError, match="zombies_ 'x' is not a list"):
            zombie_count(_reply("ZombieGetCmd", {"zombies_": "x"}), "here")
        assert zombie_count(_reply("ZombieGetCmd", {"zombies_": [{}, {}]}), "here") == 2

    @pytest.mark.timeout(30)
    def test_stuck_then_lost_and_the_deadline_holds_after_a_late_poll(
            self, silent_server: Callable[[], SilentServer]) -> None:
        """NEWS to a server that never answers: stuck (None), then lost (BackendTimeout) past
        request-timeout; a poll that came late does not push the verdict past interval +
        probe-timeout + request-timeout from the last answer, but one seconds late still leaves
        request-timeout after the first unanswered request (one more probe)."""
        quiet = silent_server()
        request = news_request("u", "h", Marks())
        live = Liveness("127.0.0.1", quiet.port, probe_timeout=0.1, request_timeout=0.3, interval=0.1)
        assert live.ask(request, "news request") is None and live.stuck_for() is not None
        with pytest.raises(BackendTimeout, match=r"did not answer a news request.*stuck for"):
            while live.ask(request, "news request") is None:
                pass
        late = Liveness("127.0.0.1", quiet.port, probe_timeout=0.1, request_timeout=0.3, interval=0.1)
        late.answered_at = time.monotonic() - 0.15  # answered, then this poll came 0.05 s late
        assert late.ask(request, "news request") is None
        assert late.deadline == pytest.approx(late.answered_at + 0.1 + 0.1 + 0.3)  # not pushed back
        slow = Liveness("127.0.0.1", quiet.port, probe_timeout=0.1, request_timeout=0.3, interval=0.1)
        slow.answered_at = time.monotonic() - 5.0  # a poll seconds late: one more probe all the same
        assert slow.ask(request, "news request") is None
        assert slow.stuck_since is not None and slow.deadline == pytest.approx(slow.stuck_since + 0.3)
        with pytest.raises(BackendTimeout, match="stuck for"):
            while slow.ask(request, "news request") is None:
                pass


def _defs_file(server: EcfServer, text: str) -> Any:
    path = server.home / "n.def"
    path.write_text(text)
    return path
