"""The session's change handle against real ecflow_server processes: what the user registered,
added, removed or auto-added is what a restarted server gets back; ``stats`` and ``ch_suites``
return the text ecFlow prints."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from flowbus.schemas import AttributeChanged, BackendRejected, RecoveryAttempted, Resynced, State, StateChanged
from flowbus.services.ecflow._stdout import parse_handles, printed
from support import ecflow as _fx
from support.ecflow import CLIENT_BIN, EcfServer, Running, reached, write_suite
from support.recorder import show

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session

Server = Callable[..., EcfServer]
Session = Callable[..., Running]


def handles_on_server(server: EcfServer) -> dict[int, list[str]]:
    """Every handle the server holds, with its suites, as the ecflow_client command line shows them."""
    out = subprocess.run([CLIENT_BIN, "--host", "127.0.0.1", "--port", str(server.port), "--ch_suites"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return {h: sorted(suites) for h, (_user, suites) in parse_handles(out).items()}


def load_suites(run: Running, server: EcfServer, *names: str) -> None:
    for name in names:
        run.call("load", write_suite(server, name, "task t\n  defstatus complete\n", {}))


class TestHandle:
    """ch_register/ch_add/ch_remove/ch_auto_add/ch_drop change the handle and are remembered."""

    @pytest.mark.timeout(60)
    def test_handle_set_survives_a_server_restart(self, ecf_server: Server, ecflow_session: Session) -> None:
        """After register a, add b+c, remove a (typed) and c (generic, by handle number), auto-add on and
        suite d created, a restarted server holds exactly {b, d}; auto-add still works afterwards."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("checkpt", "always")
        load_suites(run, server, "a", "b", "c")
        handle = run.call("ch_register", False, ["a"])
        run.call("ch_add", ["b", "c"])
        run.call("ch_remove", ["a"])
        run.call("client", "ch_remove", handle, ["c"])
        run.call("ch_auto_add", True)
        load_suites(run, server, "d")
        run.rec.wait_for(reached("/d/t", State.COMPLETE, State.UNKNOWN), 10, "d seen through the handle")
        assert handles_on_server(server) == {handle: ["b", "d"]}
        run.pause()  # the server dies and comes back between two polls
        server.kill9()
        server.start()
        assert handles_on_server(server) == {}, "a restarted server has no handles"
        n = len(run.rec.events)
        run.resume()
        run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, Resynced)], 10, "resynced")
        assert [e.action for e in run.rec.events[n:] if isinstance(e, RecoveryAttempted)] == ["ch_register"], \
            [show(e) for e in run.rec.events[n:]]
        again = handles_on_server(server)
        assert list(again.values()) == [["b", "d"]], again
        new_handle = run.call("client", "ch_handle")
        assert list(again) == [new_handle]
        load_suites(run, server, "e")  # auto-add was re-registered too
        assert handles_on_server(server) == {new_handle: ["b", "d", "e"]}
        assert parse_handles(run.call("ch_suites"))[new_handle][1] == ["b", "d", "e"]

    @pytest.mark.timeout(60)
    def test_drop_forgets_the_handle(self, ecf_server: Server, ecflow_session: Session) -> None:
        """ch_drop removes the handle on the server, the session sees every suite again, and handle
        operations without a handle are refused."""
        server = ecf_server()
        run = ecflow_session(server.port)
        load_suites(run, server, "a", "b")
        run.call("ch_register", False, ["a"])
        run.call("ch_drop")
        assert handles_on_server(server) == {}
        with pytest.raises(BackendRejected, match="no change handle"):
            run.call("ch_add", ["b"])
        with pytest.raises(BackendRejected, match="list of suite names"):
            run.call("ch_register", False, "a")
        run.call("client", "ch_register", True, ["b"])
        run.call("client", "ch_drop_user", "")  # every handle of this user: ours too
        assert handles_on_server(server) == {}
        run.call("alter", "/a/t", "add", "variable", "V", "1")
        run.call("suspend", "/a/t")
        run.rec.wait_for(reached("/a/t", State.SUSPENDED), 10, "a seen again without a handle")


class TestHandleEvents:
    """What the handle holds is what the session publishes."""

    @pytest.mark.timeout(60)
    def test_added_suites_appear_and_removed_ones_go(self, ecf_server: Server, ecflow_session: Session) -> None:
        """Registered on a: b is not published; ch_add b publishes b's nodes and its suite; ch_remove a
        publishes a's nodes UNKNOWN and its suite False."""
        server = ecf_server()
        run = ecflow_session(server.port)
        load_suites(run, server, "a", "b")
        run.rec.wait_for(reached("/b/t", State.COMPLETE, State.UNKNOWN), 10, "b seen before the handle")
        run.call("ch_register", False, ["a"])
        n = len(run.rec.events)
        run.call("ch_add", ["b"])
        run.call("alter", "/b/t", "add", "variable", "V", "1")
        run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, AttributeChanged) and e.key == "/b/t"
                                     and e.kind == "variable" and e.value == "1"], 10, "b observed through the handle")
        n = len(run.rec.events)
        run.call("ch_remove", ["a"])
        run.call("alter", "/b/t", "change", "variable", "V", "2")  # news, so the next sync comes
        gone = run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, StateChanged) and e.key == "/a/t"
                                            and e.state is State.UNKNOWN], 10, "a's task gone")[0]
        assert gone.native == "", show(gone)
        suite = run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, AttributeChanged) and e.key == "/"
                                             and e.kind == "suite" and e.name == "a"], 10, "suite a gone")[0]
        assert suite.value is False, show(suite)
        assert run.call("suites") == ["a", "b"], "the server still holds both"


class TestPrinted:
    """Replies ecFlow prints on fd 1 come back as the operation's result."""

    @pytest.mark.timeout(30)
    def test_stats_and_ch_suites_return_text(self, ecf_server: Server, ecflow_session: Session,
                                             capfd: pytest.CaptureFixture[str]) -> None:
        """stats names the server's port and counts requests; ch_suites lists the handle; nothing leaks to stdout."""
        server = ecf_server()
        run = ecflow_session(server.port)
        load_suites(run, server, "s")
        capfd.readouterr()
        stats = run.call("stats")
        assert "Server statistics" in stats and str(server.port) in stats and "Load definition" in stats, stats
        assert run.call("client", "stats").count("Server statistics") == 1
        handle = run.call("ch_register", False, ["s"])
        listed = run.call("ch_suites")
        assert parse_handles(listed) == {handle: (parse_handles(listed)[handle][0], ["s"])}, listed
        assert parse_handles(run.call("client", "ch_suites")) == parse_handles(listed)
        leaked = capfd.readouterr().out
        assert "Server statistics" not in leaked and "handle" not in leaked, leaked
        print("after")  # fd 1 is back where it was
        assert capfd.readouterr().out == "after\n"

    @pytest.mark.timeout(30)
    def test_every_handle_of_one_user_is_parsed(self, ecf_server: Server, ecflow_session: Session) -> None:
        """ecFlow prints the user only on a user's first handle line: the later handles are
        found too, under the same user."""
        import ecflow

        server = ecf_server()
        run = ecflow_session(server.port)
        load_suites(run, server, "s")
        mine = run.call("ch_register", False, ["s"])
        other = ecflow.Client("127.0.0.1", str(server.port))
        other.ch_register(False, [])
        theirs = other.ch_handle()
        try:
            listed = parse_handles(run.call("ch_suites"))
            assert {mine, theirs} <= set(listed), listed
            assert listed[mine][0] == listed[theirs][0] != "", listed
            assert (listed[mine][1], listed[theirs][1]) == (["s"], []), listed
        finally:
            other.ch_drop()

    def test_capture_restores_fd1_on_error(self, capfd: pytest.CaptureFixture[str]) -> None:
        """What a call writes to fd 1 (C stdio included) is returned; an exception leaves fd 1 where it was."""
        import ctypes
        import os

        libc = ctypes.CDLL(None)
        assert printed(lambda: (os.write(1, b"raw "), libc.printf(b"stdio"))) == "raw stdio"
        with pytest.raises(RuntimeError, match="boom"):
            printed(lambda: (os.write(1, b"lost"), (_ for _ in ()).throw(RuntimeError("boom"))))
        capfd.readouterr()
        os.write(1, b"back\n")
        assert capfd.readouterr().out == "back\n"
