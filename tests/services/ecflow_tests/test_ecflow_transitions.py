"""Transitions between two polls are not lost: a task that aborts, is requeued and aborts again
within one poll is published as two aborts (real ecflow_server)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from flowbus.schemas import State, StateChanged
from support import ecflow as _fx
from support.ecflow import EcfServer, Running, logged_finals, reached, write_suite
from support.recorder import show

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session

Server = Callable[..., EcfServer]
Session = Callable[..., Running]


def wait_logged(server: EcfServer, path: str, native: str, count: int, timeout: float) -> None:
    """Until the server's log holds ``count`` ``native`` lines for ``path`` (the server's own record)."""
    deadline = time.monotonic() + timeout
    while sum(1 for p, n, _ in logged_finals(server) if p == path and n == native) < count:
        assert time.monotonic() < deadline, f"{path} not {native} {count} times in the server log"
        time.sleep(0.02)


class TestBetweenPolls:
    """A node back in the same state on a new job run is a transition."""

    @pytest.mark.timeout(60)
    def test_abort_requeue_abort_within_one_poll(self, ecf_server: Server, ecflow_session: Session) -> None:
        """The second abort (same try number, same reason) is published, marked rerun, after the first."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "x", "task fail\n", {"fail": "exit 3\n"}, tries=1))
        run.call("begin_suite", "x")
        first = run.rec.wait_for(reached("/x/fail", State.ABORTED), 20, "first abort")
        run.pause()  # no poll until the task has aborted once more
        server.client().requeue("/x/fail", "")
        wait_logged(server, "/x/fail", "aborted", 2, 20)
        n = len(run.rec.events)
        run.resume()
        second = run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, StateChanged)
                                              and e.key == "/x/fail"], 10, "second abort")[0]
        assert second.state is State.ABORTED and second.previous is State.ABORTED, show(second)
        assert second.try_no == first.try_no == 1 and second.detail == first.detail == "trap"
        assert second.attrs.get("rerun") is True and second.attrs.get("run") != first.attrs.get("run"), show(second)
        aborts = [e for e in run.rec.of(StateChanged, "/x/fail") if e.state is State.ABORTED]
        assert len(aborts) == 2, [show(e) for e in aborts]

    @pytest.mark.timeout(60)
    def test_unchanged_task_is_not_republished_after_restart_of_session(self, ecf_server: Server,
                                                                        ecflow_session: Session) -> None:
        """A second session seeded from the first one's events publishes no rerun for an unchanged task."""
        server = ecf_server()
        first = ecflow_session(server.port)
        first.call("load", write_suite(server, "y", "task t\n", {"t": "true\n"}))
        first.call("begin_suite", "y")
        first.rec.wait_for(reached("/y", State.COMPLETE), 20, "suite complete")
        first.pause()
        known = {e.topic(): e for e in first.rec.events if isinstance(e, StateChanged)}
        second = ecflow_session(server.port, known=known, poll=False, name="e0")
        assert not [e for e in second.rec.events if isinstance(e, StateChanged) and e.key.startswith("/y")], \
            [show(e) for e in second.rec.events]
