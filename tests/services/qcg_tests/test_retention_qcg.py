"""Retention in a QCG session on a real QCG-PilotJob manager: a finished job past retention is
forgotten by the session (``Forgotten``), removed from the manager (``removeJob``) and from the
session's memory; the newest ``retain-count`` jobs are kept; ``forget-in-backend = false`` leaves
the manager alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowbus.schemas import Event, Forgotten, State, StateChanged
from support.qcg import Running, qcg_fixture, reached  # noqa: F401 - qcg_fixture provides `qcg`

pytestmark = [pytest.mark.qcg, pytest.mark.timeout(90)]


def _forgotten(key: str) -> Callable[[list[Event]], Forgotten | None]:
    return lambda evs: next((e for e in evs if isinstance(e, Forgotten) and e.key == key), None)


def _run_jobs(run: Running, names: list[str]) -> None:
    for name in names:  # one after the other: they finish in this order
        run.call("submit", [{"name": name, "exec": "/bin/true"}])
        run.rec.wait_for(reached(name, State.COMPLETE), 20, f"{name} complete")


class TestRetention:
    def test_past_retention_forgotten_in_session_and_manager(self, qcg: Callable[..., Running]) -> None:
        run = qcg(retain_hours=0.0, retain_count=2)
        _run_jobs(run, ["a", "b", "c", "d"])
        gone = run.rec.wait_for(_forgotten("b"), 20, "b forgotten")
        a = run.rec.wait_for(_forgotten("a"), 1, "a forgotten")
        assert (a.last_state, a.last_native, a.in_backend) == (State.COMPLETE, "SUCCEED", True)
        assert gone.in_backend
        assert run.rec.index(a) < run.rec.index(gone), "oldest first"
        listed = run.call("list")
        assert "a" not in listed and "b" not in listed, listed
        assert {"c", "d"} <= set(listed), "the newest retain-count jobs are kept"
        assert not run.rec.of(Forgotten, "c") and not run.rec.of(Forgotten, "d")
        book = run.session._book
        assert "a" not in book.last and "a" not in book.specs and "a" not in book.parent_of
        assert len(run.session.retention) == 2
        # the name can be used again: a fresh job, followed (and retained) anew
        run.call("submit", [{"name": "a", "exec": "/bin/true"}])
        again = run.rec.wait_for(lambda evs: [e for e in evs if isinstance(e, StateChanged) and e.key == "a"
                                              and e.state is State.COMPLETE][1:], 20, "the new a complete")
        assert again[0].previous is not State.COMPLETE, "followed from queued, not as the old job"

    def test_forget_in_backend_off_leaves_the_manager_alone(self, qcg: Callable[..., Running]) -> None:
        run = qcg(retain_hours=0.0, retain_count=1, forget_in_backend=False)
        _run_jobs(run, ["a", "b"])
        ev = run.rec.wait_for(_forgotten("a"), 20, "a forgotten")
        assert ev.in_backend is False
        assert "a" in run.call("list"), "the manager still has it"
        assert "a" not in run.session._book.last

    def test_a_young_job_is_kept_whatever_the_count(self, qcg: Callable[..., Running]) -> None:
        """retain-hours keeps a job even beyond retain-count (whichever keeps more)."""
        run = qcg(retain_hours=1.0, retain_count=0)
        _run_jobs(run, ["a", "b"])
        assert len(run.session.retention) == 2
        assert run.session.retention.due() == []
        assert not run.rec.of(Forgotten)
