"""QcgSession operations against a real manager: both job forms ``submit`` takes, ``after``
names checked before submitting, ``remove`` published, ``wait4_any_job_finish``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from flowbus.schemas import BackendRejected, BackendTimeout, Observed, State, StateChanged
from flowbus.services.qcg._forms import deps, with_deps
from flowbus.services.qcg._jobs import JobBook, Obs
from support.qcg import (
    Running,
    qcg_fixture,  # noqa: F401 - provides the `qcg` fixture
    reached,
)

#: QCG's own job JSON (as ``Jobs.add_std`` and the manager take it)
STD_JOB = {"name": "std", "execution": {"exec": "/bin/echo", "args": ["from-json"], "stdout": "std.out"},
           "resources": {"numCores": {"exact": 1}}, "dependencies": {"after": ["kw"]}}


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestSubmitForms:
    def test_qcg_job_json_is_accepted_beside_the_keyword_form(self, qcg: Callable[..., Running],
                                                              tmp_path: Path) -> None:
        """One batch mixing a keyword-form job and a QCG job JSON that depends on it runs both in
        order; the JSON job's spec is kept in its form, so resubmit works for it too."""
        run = qcg()
        assert run.call("submit", [{"name": "kw", "exec": "/bin/true"}, STD_JOB]) == ["kw", "std"]
        done = run.rec.wait_for(reached("std", State.COMPLETE), 15, "std complete")
        assert run.rec.index(run.rec.states("kw")[-1]) < run.rec.index(done)
        assert (tmp_path / "wd0" / "std.out").read_text() == "from-json\n"
        mark = len(run.rec.states("std"))
        assert run.call("resubmit", "std") == ["std"]
        run.rec.wait_for(lambda evs: next((e for e in run.rec.states("std")[mark:] if e.state is State.COMPLETE),
                                          None), 15, "std complete after resubmit")

    def test_a_job_json_that_mixes_the_forms_is_refused(self, qcg: Callable[..., Running]) -> None:
        """A job JSON with keyword-form keys, or without exec or script, is refused naming it."""
        run = qcg()
        with pytest.raises(BackendRejected, match=r"job 'mixed': .*keyword-form keys \['after'\]"):
            run.call("submit", [{"name": "mixed", "execution": {"exec": "/bin/true"}, "after": ["x"]}])
        with pytest.raises(BackendRejected, match="job 'noexec': 'execution' must be a dict with 'exec'"):
            run.call("submit", [{"name": "noexec", "execution": {"args": ["1"]}}])
        assert run.call("list") == {}


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestAfter:
    def test_unknown_after_is_refused_before_anything_is_submitted(self, qcg: Callable[..., Running]) -> None:
        """An after naming a job in neither the batch nor the manager is refused naming it (both
        forms) and no job of the batch is submitted."""
        run = qcg()
        with pytest.raises(BackendRejected, match=r"'ghost' \(after of job 'b'\): no such job"):
            run.call("submit", [{"name": "a", "exec": "/bin/true"}, {"name": "b", "exec": "/bin/true",
                                                                     "after": ["a", "ghost"]}])
        with pytest.raises(BackendRejected, match=r"'phantom:\$\{it\}' \(after of job 'std'\)"):
            run.call("submit", [{**STD_JOB, "dependencies": {"after": ["phantom:${it}"]}}])
        assert run.call("list") == {}, "a refused batch left jobs behind"
        assert run.rec.of(StateChanged) == []

    def test_after_naming_a_job_of_the_manager_is_accepted(self, qcg: Callable[..., Running]) -> None:
        """An after naming a job the manager holds (submitted earlier, or by another client the
        session has not heard of yet) or one iteration of it is accepted and runs."""
        run = qcg(poll=False)
        other = qcg(mode="connect", address=run.session.address, poll=False)
        other.call("submit", [{"name": "theirs", "exec": "/bin/true"}])
        run.call("submit", [{"name": "it", "exec": "/bin/true", "iteration": 2}])
        assert run.call("submit", [{"name": "mine", "exec": "/bin/true", "after": ["theirs", "it:1"]}]) == ["mine"]
        run.start_polling()
        assert run.call("wait4", "mine", timeout=15) == {"mine": "SUCCEED"}


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestRemove:
    def test_remove_publishes_the_job_and_its_iterations_as_removed(self, qcg: Callable[..., Running]) -> None:
        """remove() publishes unknown/REMOVED (observed=poll) for the job and each iteration, and
        nothing for a job the manager refused to remove; wait4 of a removed job returns."""
        run = qcg()
        run.call("submit", [{"name": "it", "exec": "/bin/true", "iteration": 2},
                            {"name": "long", "exec": "/bin/sleep", "args": ["30"]}])
        run.rec.wait_for(reached("it", State.COMPLETE), 15, "it complete")
        run.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        mark = len(run.rec.events)
        reply = run.call("remove", ["it", "long"])
        assert reply["removed"] == 1 and "long" in reply["errors"]
        gone = [e for e in run.rec.events[mark:] if isinstance(e, StateChanged)]
        assert sorted(e.key for e in gone) == ["it", "it:0", "it:1"], gone
        assert all(e.state is State.UNKNOWN and e.native == "REMOVED" and e.observed is Observed.POLL
                   and e.previous is State.COMPLETE and "removed from QCG manager" in e.detail for e in gone)
        assert run.call("wait4", "it", timeout=1) == {"it": "REMOVED"}
        run.call("cancel", "long")
        run.rec.wait_for(reached("long", State.CANCELLED), 15, "long cancelled")


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestWaitAny:
    def test_wait4_any_job_finish_returns_the_next_finish_not_a_stale_one(self, qcg: Callable[..., Running]) -> None:
        """wait4_any_job_finish returns the first job to finish after the call (an earlier finish
        does not count), with its QCG state; with nothing finishing it times out."""
        run = qcg()
        run.call("submit", [{"name": "early", "exec": "/bin/true"}])
        run.rec.wait_for(reached("early", State.COMPLETE), 15, "early complete")
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(run.call("wait4_any_job_finish", timeout=15)))
        waiter.start()
        try:
            run.call("submit", [{"name": "late", "exec": "/bin/false"}])
        finally:
            waiter.join(20)
        assert got == [["late", "FAILED"]]
        with pytest.raises(BackendTimeout, match=r"no job finished within 0\.2 s"):
            run.call("wait4_any_job_finish", timeout=0.2)


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestQueries:
    def test_info_and_wait4all(self, qcg: Callable[..., Running]) -> None:
        """wait4all returns every job's final QCG state; info is the manager's jobInfo reply,
        iterations included with withChilds."""
        run = qcg()
        run.call("submit", [{"name": "it", "exec": "/bin/true", "iteration": 2}, {"name": "bad", "exec": "/bin/false"}])
        assert run.call("wait4all", timeout=15) == {"it": "SUCCEED", "bad": "FAILED"}
        data = run.call("info", "it", withChilds=True)["jobs"]["it"]["data"]
        assert data["status"] == "SUCCEED" and [c["iteration"] for c in data["childs"]] == [0, 1]


class TestForms:
    def test_dependencies_of_both_forms(self) -> None:
        """deps/with_deps read and rewrite after (keyword form) and dependencies.after (JSON)."""
        assert deps({"name": "a", "exec": "x", "after": "b"}) == ["b"]
        assert deps(STD_JOB) == ["kw"]
        assert "dependencies" not in with_deps(STD_JOB, [])
        assert with_deps(STD_JOB, ["z"])["dependencies"] == {"after": ["z"]}
        assert STD_JOB["dependencies"] == {"after": ["kw"]}, "with_deps changed its argument"

    def test_respec_of_a_job_json_drops_succeeded_dependencies(self) -> None:
        """A QCG job JSON resubmitted keeps its form, without its succeeded dependencies."""
        book = JobBook("q")
        book.record([{"name": "kw", "exec": "/bin/true"}, {**STD_JOB, "dependencies": {"after": ["kw", "x"]}}])
        book.change("kw", Obs("SUCCEED"), Observed.POLL)
        assert book.respec("std") == {**STD_JOB, "dependencies": {"after": ["x"]}}
