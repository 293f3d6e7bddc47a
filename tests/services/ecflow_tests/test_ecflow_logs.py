"""``logs`` on an ecFlow session: the job output of a task's current try, from a real
ecflow_server running real jobs (ECF_JOBOUT written by the job's own shell)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from flowbus.schemas import BackendRejected, State
from support import ecflow as _fx
from support.ecflow import EcfServer, Running, reached, write_suite

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session

Server = Callable[..., EcfServer]
Session = Callable[..., Running]

pytestmark = pytest.mark.timeout(60)

SUITE = """\
family f
  task talk
  task fail
endfamily
task later
  trigger f == complete
"""
SCRIPTS = {
    "f/talk": 'echo "talk says hello-%ECF_TRYNO%"\nfor i in $(seq 1 300); do echo "filler line $i"; done\n'
              'echo "talk the last line"\n',
    "f/fail": 'echo "fail try %ECF_TRYNO% speaking"\nexit 3\n',
    "later": "echo never\n",
}


def loaded(ecf_server: Server, ecflow_session: Session) -> tuple[EcfServer, Running]:
    server = ecf_server()
    run = ecflow_session(server.port)
    run.call("load", write_suite(server, "lg", SUITE, SCRIPTS, tries=2))
    run.call("begin_suite", "lg")
    run.rec.wait_for(reached("/lg/f/talk", State.COMPLETE), 20, "talk complete")
    run.rec.wait_for(reached("/lg/f/fail", State.ABORTED, try_no=2), 20, "fail aborted on its second try")
    return server, run


class TestEcflowLogs:
    """The job output of a task as the job wrote it."""

    def test_completed_task_output(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A completed task's job output is returned whole, named by its try, with its path."""
        server, run = loaded(ecf_server, ecflow_session)
        got = run.call("logs", "/lg/f/talk")
        assert got["key"] == "/lg/f/talk" and "reason" not in got, got
        [part] = got["parts"]
        assert part["name"] == "jobout.1" and part["path"] == str(server.home / "lg" / "f" / "talk.1"), part
        assert "talk says hello-1" in part["text"] and "talk the last line" in part["text"]
        assert part["truncated"] is False

    def test_current_try_only(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A task retried by ECF_TRIES shows its current (second) try's output, not the first's."""
        _, run = loaded(ecf_server, ecflow_session)
        [part] = run.call("logs", "/lg/f/fail")["parts"]
        assert part["name"] == "jobout.2" and "fail try 2 speaking" in part["text"], part
        assert "fail try 1" not in part["text"]

    def test_max_bytes_keeps_the_end(self, ecf_server: Server, ecflow_session: Session) -> None:
        """With a small max_bytes only the end is returned, marked truncated."""
        _, run = loaded(ecf_server, ecflow_session)
        [part] = run.call("logs", "/lg/f/talk", max_bytes=64)["parts"]
        assert part["truncated"] is True and len(part["text"].encode()) <= 64
        assert "talk the last line" in part["text"] and "hello" not in part["text"]

    def test_no_output_has_a_reason(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A family and a task never submitted give no parts and a reason saying why."""
        _, run = loaded(ecf_server, ecflow_session)
        family = run.call("logs", "/lg/f")
        assert family["parts"] == [] and "family" in family["reason"] and "task" in family["reason"], family
        later = run.call("logs", "/lg/later")
        assert later["parts"] == [] and "not been submitted" in later["reason"], later

    def test_unreadable_file_falls_back_to_the_server(self, ecf_server: Server, ecflow_session: Session) -> None:
        """The file gone from here: the server's file command is asked, and its refusal is the reason."""
        server, run = loaded(ecf_server, ecflow_session)
        os.unlink(server.home / "lg" / "f" / "talk.1")
        got = run.call("logs", "/lg/f/talk")
        assert got["parts"] == [], got
        assert "talk.1" in got["reason"] and "server" in got["reason"], got["reason"]
        run.call("ping")

    def test_output_only_the_server_can_read(self, ecf_server: Server, ecflow_session: Session) -> None:
        """ECF_JOBOUT relative to the server's directory (a path that means something else here):
        the output comes through the server's file command, with the server's path."""
        server = ecf_server()
        run = ecflow_session(server.port)
        body = "family away\n  edit ECF_HOME '.'\n  task t\nendfamily\n"
        run.call("load", write_suite(server, "rel", body, {"away/t": 'echo "sent by the server"\n'}))
        run.call("begin_suite", "rel")
        run.rec.wait_for(reached("/rel/away/t", State.COMPLETE), 20, "t complete")
        assert not os.path.exists("rel/away/t.1") and (server.home / "rel" / "away" / "t.1").exists()
        [part] = run.call("logs", "/rel/away/t")["parts"]
        assert part["name"] == "jobout.1" and part["path"] == "./rel/away/t.1", part
        assert "sent by the server" in part["text"] and not part["truncated"], part

    def test_bad_key_and_bad_max_bytes(self, ecf_server: Server, ecflow_session: Session) -> None:
        """An unknown path and an out-of-range max_bytes are BackendRejected naming logs and what was wrong."""
        _, run = loaded(ecf_server, ecflow_session)
        with pytest.raises(BackendRejected, match=r"logs: unknown node '/lg/nope'"):
            run.call("logs", "/lg/nope")
        with pytest.raises(BackendRejected, match=r"logs: max_bytes must be .* got 0"):
            run.call("logs", "/lg/f/talk", max_bytes=0)
        run.call("ping")
