"""Reruns: a task back in the same state on a new job run, its family and suite with it, and the
run token carried by the events so a session seeded from the journal still tells a new run
(pure rule on synthetic snapshots, then a real ecflow_server)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import pytest

from flowbus.schemas import Event, Observed, State, StateChanged
from flowbus.services.ecflow._tree import NodeObs, Snapshot, Tree
from support import ecflow as _fx
from support.ecflow import EcfServer, Running, logged_finals, reached, write_suite
from support.recorder import show

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session

Server = Callable[..., EcfServer]
Session = Callable[..., Running]


def _tree(nodes: dict[str, NodeObs]) -> Tree:
    tree = Tree("e")
    tree.diff(Snapshot(full=True, server="RUNNING", suites=["s"], nodes=nodes), Observed.RESYNC)
    return tree


def _reruns(events: Sequence[Event]) -> list[str]:
    return [e.key for e in events if isinstance(e, StateChanged) and e.attrs.get("rerun")]


class TestRule:
    """The family/suite rule on synthetic reads."""

    BASE: ClassVar[dict[str, NodeObs]] = {"/s": NodeObs("aborted"), "/s/f": NodeObs("aborted"), "/s/f/a": NodeObs("aborted", 1, "trap", "r1"),
            "/s/f/b": NodeObs("complete", 1, "", "r9"), "/s/g": NodeObs("complete")}

    def test_family_and_suite_go_round_with_their_only_aborted_task(self) -> None:
        tree = _tree(dict(self.BASE))
        events = tree.diff(Snapshot(full=False, server="RUNNING", suites=["s"],
                                    nodes={"/s/f/a": NodeObs("aborted", 1, "trap", "r2")}), Observed.POLL)
        assert _reruns(events) == ["/s/f/a", "/s/f", "/s"], [show(e) for e in events]
        family = next(e for e in events if isinstance(e, StateChanged) and e.key == "/s/f")
        assert family.state is family.previous is State.ABORTED and family.attrs == {"rerun": True}

    def test_a_sibling_holding_the_state_keeps_the_family(self) -> None:
        """b stays aborted while a reruns: the family never left aborted (nor the suite)."""
        tree = _tree({**self.BASE, "/s/f/b": NodeObs("aborted", 1, "trap", "r9")})
        events = tree.diff(Snapshot(full=False, server="RUNNING", suites=["s"],
                                    nodes={"/s/f/a": NodeObs("aborted", 1, "trap", "r2")}), Observed.POLL)
        assert _reruns(events) == ["/s/f/a"], [show(e) for e in events]

    def test_a_sibling_family_holding_the_state_keeps_the_suite(self) -> None:
        tree = _tree({**self.BASE, "/s/g": NodeObs("aborted")})
        events = tree.diff(Snapshot(full=False, server="RUNNING", suites=["s"],
                                    nodes={"/s/f/a": NodeObs("aborted", 1, "trap", "r2")}), Observed.POLL)
        assert _reruns(events) == ["/s/f/a", "/s/f"], [show(e) for e in events]

    def test_a_retry_with_a_new_try_number_counts_and_suspended_never_goes_round(self) -> None:
        tree = _tree({**self.BASE, "/s": NodeObs("suspended")})
        events = tree.diff(Snapshot(full=False, server="RUNNING", suites=["s"],
                                    nodes={"/s/f/a": NodeObs("aborted", 2, "trap", "r2")}), Observed.POLL)
        assert _reruns(events) == ["/s/f/a", "/s/f"], [show(e) for e in events]
        assert [e.try_no for e in events if isinstance(e, StateChanged) and e.key == "/s/f/a"] == [2]

    def test_the_run_token_is_seeded_from_the_journal(self) -> None:
        """Events carry attrs.run; a tree seeded from them tells the same run from a new one."""
        journal = {f"k{i}": e for i, e in enumerate(Tree("e").diff(
            Snapshot(full=True, server="RUNNING", suites=["s"], nodes=dict(self.BASE)), Observed.RESYNC))}
        task = next(e for e in journal.values() if isinstance(e, StateChanged) and e.key == "/s/f/a")
        assert task.attrs == {"run": "r1"}
        seeded = Tree("e")
        seeded.seed(journal)
        assert seeded.diff(Snapshot(full=True, server="RUNNING", suites=["s"], nodes=dict(self.BASE)),
                           Observed.RESYNC) == []
        again = {**self.BASE, "/s/f/a": NodeObs("aborted", 1, "trap", "r2")}
        events = seeded.diff(Snapshot(full=True, server="RUNNING", suites=["s"], nodes=again), Observed.RESYNC)
        assert _reruns(events) == ["/s/f/a", "/s/f", "/s"], [show(e) for e in events]


def wait_logged(server: EcfServer, path: str, native: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for p, n, _ in logged_finals(server) if p == path and n == native) < count:
        assert time.monotonic() < deadline, f"{path} not {native} {count} times in the server log"
        time.sleep(0.02)


class TestServer:
    @pytest.mark.timeout(60)
    def test_family_and_suite_rerun_with_the_task(self, ecf_server: Server, ecflow_session: Session) -> None:
        """Abort, requeue, abort within one poll: the task, its family and its suite each publish
        a second abort (marked rerun); the sibling family that stayed complete does not."""
        server = ecf_server()
        run = ecflow_session(server.port)
        body = "family f\n  task fail\nendfamily\nfamily g\n  task ok\n    defstatus complete\nendfamily\n"
        run.call("load", write_suite(server, "x", body, {"f/fail": "exit 3\n"}, tries=1))
        run.call("begin_suite", "x")
        run.rec.wait_for(reached("/x", State.ABORTED), 20, "suite aborted")
        run.pause()
        server.client().requeue("/x/f/fail", "")
        wait_logged(server, "/x/f/fail", "aborted", 2, 20)
        n = len(run.rec.events)
        run.resume()
        run.rec.wait_for(lambda es: {"/x/f/fail", "/x/f", "/x"} <= set(_reruns(es[n:])), 10, "reruns published")
        assert sorted(_reruns(run.rec.events[n:])) == ["/x", "/x/f", "/x/f/fail"]
        aborted = [e.key for e in run.rec.events if isinstance(e, StateChanged) and e.state is State.ABORTED]
        assert aborted.count("/x") == aborted.count("/x/f") == aborted.count("/x/f/fail") == 2, aborted

    @pytest.mark.timeout(60)
    def test_rerun_while_away_is_found_by_a_session_seeded_from_the_journal(
            self, ecf_server: Server, ecflow_session: Session) -> None:
        """The first session stops; the task reruns to the same abort; a second session seeded with
        the first one's events publishes the rerun on resync (the same run would publish nothing)."""
        server = ecf_server()
        first = ecflow_session(server.port)
        first.call("load", write_suite(server, "y", "task fail\n", {"fail": "exit 3\n"}, tries=1))
        first.call("begin_suite", "y")
        first.rec.wait_for(reached("/y/fail", State.ABORTED), 20, "aborted")
        first.rec.wait_for(lambda es: [e for e in es if isinstance(e, StateChanged) and e.key == "/y/fail"
                                       and e.attrs.get("run")], 10, "the abort with its run token")
        first.pause()
        journal = {e.topic(): e for e in first.rec.events}
        same = ecflow_session(server.port, known=journal, poll=False)
        assert not [e for e in same.rec.events if isinstance(e, StateChanged) and e.key.startswith("/y")], \
            [show(e) for e in same.rec.events]
        server.client().requeue("/y/fail", "")
        wait_logged(server, "/y/fail", "aborted", 2, 20)
        later = ecflow_session(server.port, known=journal, poll=False)
        events = [e for e in later.rec.events if isinstance(e, StateChanged) and e.key.startswith("/y")]
        assert sorted(_reruns(events)) == ["/y", "/y/fail"], [show(e) for e in events]
        assert all(e.observed is Observed.RESYNC for e in events)
