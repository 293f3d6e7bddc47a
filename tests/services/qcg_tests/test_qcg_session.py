"""QcgSession against a real QCG-PilotJob LocalManager (no Ray, no bus).

Every test is bounded (pytest-timeout) and its fixture proves that no process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from structlog.testing import capture_logs

from flowbus.schemas import (
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Connected,
    Disconnected,
    Event,
    Observed,
    RecoveryAttempted,
    RecoveryGaveUp,
    Resynced,
    State,
    StateChanged,
    UnknownOperation,
)
from flowbus.services import BackendSession
from flowbus.services.qcg._jobs import JobBook, Obs, Snapshot

# -- helpers ----------------------------------------------------------------------------------------
from support import poll
from support.qcg import (
    Running,
    assert_opened_down,
    first,
    job_pids,
    pid_gone,
    qcg_fixture,  # noqa: F401 - provides the `qcg` fixture
    reached,
    wait_pid_gone,
)
from support.recorder import show  # shared with the other adapters' tests

# -- tests ------------------------------------------------------------------------------------------


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestJobs:
    def test_dependencies_and_iterations_complete(self, qcg: Callable[..., Running]) -> None:
        """Jobs with after= and an iterated job reach complete under the right keys."""
        run = qcg()
        names = run.call("submit", [
            {"name": "a", "exec": "/bin/sleep", "args": ["0.3"]},
            {"name": "b", "exec": "/bin/true", "after": "a"},
            {"name": "it", "exec": "/bin/echo", "args": ["${it}"], "iteration": 3, "stdout": "it_${it}.out"},
        ])
        assert names == ["a", "b", "it"]
        for key in ("a", "b", "it", "it:0", "it:1", "it:2"):
            run.rec.wait_for(reached(key, State.COMPLETE), 15, f"{key} complete")
        for it in range(3):
            final = run.rec.states(f"it:{it}")[-1]
            assert final.attrs["parent"] == "it" and final.attrs["iteration"] == it and final.native == "SUCCEED"
        a_done = run.rec.index(run.rec.states("a")[-1])
        b_started = run.rec.index(run.rec.states("b")[1])
        assert a_done < b_started, "b was scheduled before a finished"
        assert [e.state for e in run.rec.states("a")] == [State.QUEUED, State.SUBMITTED, State.ACTIVE, State.COMPLETE]

    def test_failure_aborts_and_omits_dependant(self, qcg: Callable[..., Running]) -> None:
        """/bin/false ends aborted (native FAILED, exit code 1); its dependant is cancelled (OMITTED)."""
        run = qcg()
        run.call("submit", [{"name": "bad", "exec": "/bin/false"},
                            {"name": "dep", "exec": "/bin/true", "after": "bad"}])
        bad = run.rec.wait_for(reached("bad", State.ABORTED), 15, "bad aborted")
        assert bad.native == "FAILED" and bad.attrs.get("exit_code") == 1
        dep = run.rec.wait_for(reached("dep", State.CANCELLED), 15, "dep cancelled")
        assert dep.native == "OMITTED"

    def test_cancel_running_job(self, qcg: Callable[..., Running]) -> None:
        """Cancelling a running sleep 30 ends it cancelled (native CANCELED) and kills its process."""
        run = qcg()
        run.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["30"]}])
        run.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        pids = job_pids(run.session.service_pid or 0, "sleep")
        reply = run.call("cancel", "long")
        assert reply["canceled"] == 1
        ev = run.rec.wait_for(reached("long", State.CANCELLED), 15, "long cancelled")
        assert ev.native == "CANCELED"
        assert all(wait_pid_gone(p, 5) for p in pids)

    def test_remove_and_resubmit_same_name(self, qcg: Callable[..., Running]) -> None:
        """After remove + resubmit the first event for the name is queued, and the old job's
        final events, still unread in the SUB socket, do not end the new job."""
        run = qcg(poll=False)  # nobody reads the publisher yet: the old job's events stay queued
        run.call("submit", [{"name": "x", "exec": "/bin/true"}])
        poll.until(lambda: run.call("status", "x")["jobs"]["x"]["data"]["status"] == "SUCCEED", 10,
                   "job x SUCCEED in the manager", every=0.02)
        assert run.call("remove", ["x"]) == {"removed": 1}
        mark = len(run.rec.states("x"))
        run.call("submit", [{"name": "x", "exec": "/bin/sleep", "args": ["1"]}])
        assert run.rec.states("x")[mark].state is State.QUEUED, "queued is published before submit returns"
        run.start_polling()
        done = run.rec.wait_for(reached("x", State.COMPLETE), 15, "x complete")
        assert run.call("status", "x")["jobs"]["x"]["data"]["status"] == "SUCCEED", "a stale final was believed"
        assert run.rec.index(done) > run.rec.index(run.rec.states("x")[mark])
        again = [e.state for e in run.rec.states("x")[mark:]]
        assert again[0] is State.QUEUED and again[-1] is State.COMPLETE and again.count(State.COMPLETE) == 1, again

    def test_remove_refuses_unfinished_job(self, qcg: Callable[..., Running]) -> None:
        """remove() of a running job reports the manager's refusal and keeps tracking the job."""
        run = qcg()
        run.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["30"]}])
        run.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        reply = run.call("remove", "long")
        assert reply["removed"] == 0 and "not finished" in reply["errors"]["long"]
        run.call("cancel", ["long"])
        run.rec.wait_for(reached("long", State.CANCELLED), 15, "long cancelled")

    def test_resubmit_from_the_sessions_own_spec(self, qcg: Callable[..., Running], tmp_path: Path) -> None:
        """resubmit(name) removes a failed job and submits the spec this session recorded again
        (queued first, then complete); a running job, a job another client submitted and a bad
        name are refused, each naming why, and the refused jobs are left as they were."""
        flag = tmp_path / "ran-once"
        run = qcg()
        run.call("submit", [{"name": "flaky", "exec": "/bin/sh",
                             "args": ["-c", f"if [ -e {flag} ]; then exit 0; fi; touch {flag}; exit 1"]}])
        run.rec.wait_for(reached("flaky", State.ABORTED), 15, "flaky failed")
        mark = len(run.rec.states("flaky"))
        assert run.call("resubmit", "flaky") == ["flaky"]
        assert run.rec.states("flaky")[mark].state is State.QUEUED, "queued is published before resubmit returns"
        run.rec.wait_for(lambda evs: next((e for e in run.rec.states("flaky")[mark:] if e.state is State.COMPLETE),
                                          None), 15, "flaky complete after resubmit")
        other = qcg(mode="connect", address=run.session.address)  # another client of the same manager
        other.call("submit", [{"name": "theirs", "exec": "/bin/false"}])
        run.rec.wait_for(reached("theirs", State.ABORTED), 15, "theirs failed (seen by run)")
        with pytest.raises(BackendRejected, match="spec of job 'theirs' is unknown to session 'q0'"):
            run.call("resubmit", "theirs")
        assert run.call("status", "theirs")["jobs"]["theirs"]["data"]["status"] == "FAILED"
        run.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["30"]}])
        run.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        with pytest.raises(BackendRejected, match=r"refused to remove job 'long'.*not finished"):
            run.call("resubmit", "long")
        run.call("cancel", "long")
        run.rec.wait_for(reached("long", State.CANCELLED), 15, "long cancelled")
        assert run.call("resubmit", "long") == ["long"], "the spec was kept after the refusal"
        run.call("cancel", "long")
        with pytest.raises(BackendRejected, match="expects one job name"):
            run.call("resubmit", ["flaky"])

    def test_results_are_plain_data(self, qcg: Callable[..., Running]) -> None:
        """list/status/info_parsed/resources answer with plain dicts (JobInfo converted)."""
        run = qcg()
        run.call("submit", [{"name": "it", "exec": "/bin/true", "iteration": 2}])
        run.call("wait4", "it", timeout=15)
        assert run.call("list")["it"]["status"] == "SUCCEED"
        assert run.call("status", ["it"])["jobs"]["it"]["data"]["status"] == "SUCCEED"
        parsed = run.call("info_parsed", "it", withChilds=True)["it"]
        assert parsed["status"] == "SUCCEED" and [c["name"] for c in parsed["childs"]] == ["it:0", "it:1"]
        assert run.call("resources")["total_cores"] == 2
        assert run.call("system_status")["System"]["InstanceId"] == run.session.instance_id
        assert set(run.session.operations()) >= {"submit", "list", "status", "info", "info_parsed", "remove",
                                                  "cancel", "finish", "resources", "system_status"}


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestErrors:
    def test_unknown_operation(self, qcg: Callable[..., Running]) -> None:
        """An operation name the session does not know raises UnknownOperation listing the known
        ones; arguments that do not fit an operation are BackendRejected naming it."""
        run = qcg()
        with pytest.raises(UnknownOperation, match="'frobnicate'; known: cancel, finish, info"):
            run.call("frobnicate")
        with pytest.raises(BackendRejected, match="status: missing a required argument: 'names'"):
            run.call("status")
        with pytest.raises(BackendRejected, match="list: too many positional arguments"):
            run.call("list", "x")

    def test_wd_that_cannot_be_made_fails_the_start(self, qcg: Callable[..., Running], tmp_path: Path) -> None:
        """A wd no manager can ever work in is the one start() failure: BackendRejected naming the
        session and the wd, nothing published, the session closed."""
        (tmp_path / "a-file").write_text("")
        run = qcg(start=False, poll=False, wd=str(tmp_path / "a-file" / "wd"))
        with pytest.raises(BackendRejected, match=r"session 'q0': wd '.*a-file/wd' cannot be made"):
            run.session.start(run.rec, {})
        assert run.rec.events == [] and run.session.phase == "closed"

    def test_finish_of_the_sessions_own_manager_is_refused(self, qcg: Callable[..., Running]) -> None:
        """finish() would end the manager the session started and observes: refused, naming why
        and what to do instead; the manager and the session go on."""
        run = qcg()
        with pytest.raises(BackendRejected, match=r"finish: refused on session 'q0'.*stop the session instead"):
            run.call("finish")
        assert run.call("system_status")["System"]["InstanceId"] == run.session.instance_id
        assert run.session.phase == "up" and run.rec.of(Disconnected) == []

    def test_too_many_cores_is_rejected_with_manager_message(self, qcg: Callable[..., Running]) -> None:
        """numCores beyond the resources is refused with the manager's own message."""
        run = qcg()
        with pytest.raises(BackendRejected, match="Not enough resources for job big"):
            run.call("submit", [{"name": "big", "exec": "/bin/true", "numCores": 64}])
        assert run.rec.states("big") == []

    def test_invalid_description_is_rejected(self, qcg: Callable[..., Running]) -> None:
        """A job with neither exec nor script, or a bad argument shape, is BackendRejected."""
        run = qcg()
        with pytest.raises(BackendRejected):
            run.call("submit", [{"name": "nothing"}])
        with pytest.raises(BackendRejected):
            run.call("submit", {"name": "not-a-list", "exec": "/bin/true"})
        with pytest.raises(BackendRejected, match="doesn't exist"):
            run.call("status", ["ghost"])

    def test_dead_manager_without_recovery_fails_fast(self, qcg: Callable[..., Running]) -> None:
        """With recovery none, kill -9 gives Disconnected(will_retry=False); calls fail within ~3 s."""
        run = qcg(recovery="none")
        run.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["30"]}])
        run.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        orphan = job_pids(run.session.service_pid or 0, "sleep")
        os.kill(run.session.service_pid or 0, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises((BackendTimeout, BackendUnavailable)):
            run.call("list")
        assert time.monotonic() - t0 < 3.0
        dis = run.rec.wait_for(first(Disconnected), 3, "disconnected")
        assert dis.will_retry is False
        lost = run.rec.wait_for(reached("long", State.UNKNOWN), 5, "long lost")
        assert lost.native == "LOST" and lost.observed is Observed.RESYNC
        assert all(wait_pid_gone(p, 3) for p in orphan)
        with pytest.raises(BackendUnavailable):
            run.call("submit", [{"name": "later", "exec": "/bin/true"}])

    def test_connect_to_nothing_opens_disconnected(self, qcg: Callable[..., Running]) -> None:
        """Connect mode against a dead address: start() returns after the request timeout with the
        session down (Disconnected, will retry, naming why); calls name the session; each
        reconnect is reported, then RecoveryGaveUp."""
        run = qcg(start=False, poll=False, mode="connect", address="tcp://127.0.0.1:9", request_timeout=1.0,
                  recovery_attempts=2)
        t0 = time.monotonic()
        run.session.start(run.rec, {})
        assert time.monotonic() - t0 < 3.0
        assert_opened_down(run, "no reply")
        run.start_polling()
        gave_up = run.rec.wait_for(first(RecoveryGaveUp), 15, "gave up")
        assert gave_up.attempts == 2 and run.session.phase == "dead"
        tries = [(e.action, e.attempt, e.ok) for e in run.rec.of(RecoveryAttempted)]
        assert tries == [("reconnect", 1, False), ("reconnect", 2, False)]
        assert run.rec.of(Connected) == []


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestRecovery:
    def test_kill9_restarts_manager_and_resubmits(self, qcg: Callable[..., Running]) -> None:
        """kill -9 of the manager: Disconnected in < 3 s, orphan killed, restart, unfinished jobs
        resubmitted (after= on a succeeded job dropped) and complete."""
        run = qcg(recovery="resubmit")
        run.call("submit", [{"name": "done", "exec": "/bin/true"}])
        run.rec.wait_for(reached("done", State.COMPLETE), 15, "done complete")
        run.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["2"]},
                            {"name": "dep", "exec": "/bin/true", "after": ["done", "long"]}])
        run.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        first_id = run.session.instance_id
        orphan = job_pids(run.session.service_pid or 0, "sleep")
        assert orphan, "the sleep job process was not found"
        os.kill(run.session.service_pid or 0, signal.SIGKILL)
        t0 = time.monotonic()
        dis = run.rec.wait_for(first(Disconnected), 3, "disconnected")
        assert run.rec.times[run.rec.index(dis)] - t0 < 3.0 and dis.will_retry is True
        assert all(wait_pid_gone(p, 1.5) for p in orphan), "orphaned job survived the manager"
        restart = run.rec.wait_for(lambda evs: next((e for e in evs if isinstance(e, RecoveryAttempted)
                                                     and e.action == "restart-manager" and e.ok), None), 10, "restart")
        conn = run.rec.wait_for(lambda evs: [e for e in evs if isinstance(e, Connected)][1:], 10, "reconnected")[0]
        assert conn.detail != first_id
        lost = run.rec.wait_for(reached("long", State.UNKNOWN), 5, "long lost")
        assert lost.native == "LOST" and lost.observed is Observed.RESYNC
        resub = run.rec.wait_for(lambda evs: {e.key for e in evs if isinstance(e, RecoveryAttempted)
                                              and e.action == "resubmit"} >= {"long", "dep"} or None, 10, "resubmit")
        assert resub
        order = [run.rec.index(e) for e in (dis, restart, conn, lost)]
        assert order == sorted(order), "expected Disconnected < RecoveryAttempted < Connected < LOST"
        for key in ("long", "dep"):
            run.rec.wait_for(reached(key, State.COMPLETE), 20, f"{key} complete after resubmit")
        assert [e.native for e in run.rec.states("done")][-1] == "SUCCEED", "a finished job is not rerun"
        assert len([e for e in run.rec.states("done") if e.state is State.QUEUED]) == 1


    def test_manager_that_cannot_start_is_started_later(self, qcg: Callable[..., Running],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """A manager that cannot be started at start(): start() returns with the session down
        (Disconnected, will retry); the next attempt starts one: RecoveryAttempted, Connected,
        the resync diff (a job the bus knew is LOST), Resynced, and calls work."""
        from flowbus.services.qcg._link import open_local as real

        tries: list[tuple[Any, ...]] = []

        def once_refused(*args: Any, **kwargs: Any) -> Any:
            tries.append(args)
            if len(tries) == 1:
                raise BackendUnavailable("start-manager: refused once by the test")
            return real(*args, **kwargs)

        monkeypatch.setattr("flowbus.services.qcg._session.open_local", once_refused)
        known = {"ghost": StateChanged(source="q0", backend="qcg", key="ghost", state=State.ACTIVE, native="EXECUTING")}
        run = qcg(known=known, poll=False)
        assert_opened_down(run, "refused once")
        assert run.session.address == ""
        run.start_polling()
        resynced = run.rec.wait_for(first(Resynced), 10, "resynced")
        assert resynced.changed == 1 and run.session.phase == "up"
        tried = run.rec.of(RecoveryAttempted)
        assert [(e.action, e.attempt, e.ok) for e in tried] == [("restart-manager", 1, True)]
        conn = run.rec.of(Connected)[0]
        ghost = run.rec.states("ghost")[-1]
        assert ghost.native == "LOST" and ghost.observed is Observed.RESYNC
        order = [run.rec.index(e) for e in (tried[0], conn, ghost, resynced)]
        assert order == sorted(order), [show(e) for e in run.rec.events]
        run.call("submit", [{"name": "now", "exec": "/bin/true"}])
        run.rec.wait_for(reached("now", State.COMPLETE), 15, "now complete")

    def test_gives_up_after_failed_restarts(self, qcg: Callable[..., Running],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """When no new manager can be started, each attempt is reported, then RecoveryGaveUp and LOST."""
        run = qcg(recovery="restart", recovery_attempts=2)
        run.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["30"]}])
        run.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise BackendUnavailable("start-manager: refused by the test")

        monkeypatch.setattr("flowbus.services.qcg._session.open_local", refuse)
        os.kill(run.session.service_pid or 0, signal.SIGKILL)
        gave_up = run.rec.wait_for(first(RecoveryGaveUp), 10, "gave up")
        assert gave_up.attempts == 2
        tries = [e for e in run.rec.of(RecoveryAttempted) if e.action == "restart-manager"]
        assert [(e.attempt, e.ok) for e in tries] == [(1, False), (2, False)]
        assert run.rec.states("long")[-1].native == "LOST"
        with pytest.raises(BackendUnavailable):
            run.call("list")


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestConnectMode:
    def test_observes_foreign_manager_and_detects_its_death(self, qcg: Callable[..., Running]) -> None:
        """A connect-mode session sees jobs, leaves the manager running at stop, and reports its
        death (found by a timed-out ping) without restarting it."""
        owner = qcg(recovery="none")
        viewer = qcg(mode="connect", address=owner.session.address, recovery="resubmit", recovery_attempts=1)
        assert viewer.rec.of(Connected)[0].detail == owner.session.instance_id
        viewer.call("submit", [{"name": "v", "exec": "/bin/true"}])
        viewer.rec.wait_for(reached("v", State.COMPLETE), 15, "v complete (viewer)")
        owner.rec.wait_for(reached("v", State.COMPLETE), 15, "v complete (owner, via its publisher)")
        os.kill(owner.session.service_pid or 0, signal.SIGKILL)
        dis = viewer.rec.wait_for(first(Disconnected), 5, "viewer disconnected")
        assert dis.will_retry is True
        viewer.rec.wait_for(first(RecoveryGaveUp), 10, "gave up")
        reconnects = list(viewer.rec.of(RecoveryAttempted))
        assert [e.action for e in reconnects] == ["reconnect"] and not reconnects[0].ok

    def test_finish_ends_the_foreign_manager_and_the_session(self, qcg: Callable[..., Running]) -> None:
        """finish() of a connect-mode session ends the manager it connected to and the session
        (Disconnected "finished", no retry); its owner sees the manager end."""
        owner = qcg(recovery="none")
        pid = owner.session.service_pid
        assert pid is not None
        viewer = qcg(mode="connect", address=owner.session.address)
        assert viewer.call("finish") is None
        last = viewer.rec.events[-1]
        assert isinstance(last, Disconnected) and last.reason == "finished" and not last.will_retry
        assert viewer.session.phase == "dead"
        with pytest.raises(BackendUnavailable, match="list: session 'q1'"):
            viewer.call("list")
        assert owner.rec.wait_for(first(Disconnected), 5, "owner disconnected").will_retry is False
        assert wait_pid_gone(pid, 5)

    def test_stop_leaves_foreign_manager_running(self, qcg: Callable[..., Running]) -> None:
        """stop() of a connect-mode session disconnects without finishing the manager."""
        owner = qcg()
        viewer = qcg(mode="connect", address=owner.session.address)
        viewer.session.stop()
        assert viewer.rec.events[-1] == Disconnected(source=viewer.session.name, backend="qcg", reason="stopped",
                                                     will_retry=False)
        assert owner.call("system_status")["System"]["InstanceId"] == owner.session.instance_id


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestResyncAndAdoption:
    def test_known_job_missing_from_manager_is_lost(self, qcg: Callable[..., Running]) -> None:
        """A job the bus knew as running but the new manager lacks is resynced as LOST; finals stay."""
        known: dict[str, Event] = {
            "ghost": StateChanged(source="q0", backend="qcg", key="ghost", state=State.ACTIVE, native="EXECUTING"),
            "old": StateChanged(source="q0", backend="qcg", key="old", state=State.COMPLETE, native="SUCCEED"),
        }
        run = qcg(known=known)
        ghost = run.rec.states("ghost")
        assert len(ghost) == 1 and ghost[0].observed is Observed.RESYNC
        assert ghost[0].state is State.UNKNOWN and ghost[0].native == "LOST" and ghost[0].previous is State.ACTIVE
        assert run.rec.states("old") == []
        assert isinstance(run.rec.events[0], Connected)
        assert run.rec.of(Resynced)[0].changed == 1

    def test_adopts_manager_of_killed_incarnation(self, qcg: Callable[..., Running], tmp_path: Path) -> None:
        """A manager left by a SIGKILLed owner is adopted by address with its running job, then
        finished at stop with nothing left running."""
        script = textwrap.dedent(f"""
            import json, os, signal, sys
            from flowbus.schemas import QcgSessionConfig
            from flowbus.services.qcg import QcgSession
            s = QcgSession(QcgSessionConfig(name="prev", wd={str(tmp_path / 'prev')!r}))
            s.start(lambda ev: None, {{}})
            s.call("submit", [{{"name": "long", "exec": "/bin/sleep", "args": ["30"]}}])
            print(json.dumps({{"address": s.address, "pid": s.service_pid, "id": s.instance_id}}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        out, err = tmp_path / "prev.out", tmp_path / "prev.err"
        with out.open("w") as fout, err.open("w") as ferr:  # not pipes: the orphaned manager inherits them
            code = subprocess.run([sys.executable, "-c", script], stdout=fout, stderr=ferr, timeout=30).returncode
        assert code == -signal.SIGKILL, err.read_text()[-2000:]
        prev = json.loads(out.read_text().strip().splitlines()[-1])
        service = psutil.Process(prev["pid"])
        try:
            hint = Connected(source="q0", backend="qcg", address=prev["address"], detail=prev["id"])
            queued = StateChanged(source="q0", backend="qcg", key="long", state=State.QUEUED, native="QUEUED")
            run = qcg(known={"": hint, "long": queued})
            assert run.session.address == prev["address"] and run.session.instance_id == prev["id"]
            assert run.session.service_pid == prev["pid"]
            resynced = [e for e in run.rec.states("long") if e.observed is Observed.RESYNC]
            assert resynced and resynced[-1].state in (State.SUBMITTED, State.ACTIVE)
            sleeper = job_pids(prev["pid"], "sleep")
            assert sleeper, "the previous incarnation's job is not running"
            run.session.stop()
            assert wait_pid_gone(prev["pid"], 5), "adopted manager still running after stop()"
            assert all(wait_pid_gone(p, 3) for p in sleeper)
            assert run.rec.states("long")[-1].state is State.CANCELLED
        finally:
            if not pid_gone(service.pid):
                service.kill()


    def test_release_leaves_manager_and_jobs_to_the_next_incarnation(self, qcg: Callable[..., Running]) -> None:
        """release() publishes nothing and leaves the manager and its running job alone (stop and
        kill afterwards do nothing more); a new session given the address adopts both."""
        first = qcg()
        first.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["30"]}])
        first.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        address, instance, pid = first.session.address, first.session.instance_id, first.session.service_pid
        assert pid is not None
        sleeper = job_pids(pid, "sleep")
        assert sleeper, "the job is not running"
        first.stop.set()  # the host stops polling a fenced session before it releases it
        assert first.thread is not None
        first.thread.join(5)
        mark = len(first.rec.events)
        first.session.release()
        first.session.release()
        first.session.stop()
        first.session.kill()
        assert len(first.rec.events) == mark, [show(e) for e in first.rec.events[mark:]]
        assert not pid_gone(pid) and not any(pid_gone(p) for p in sleeper), "release ended the manager or its job"
        with pytest.raises(BackendUnavailable):
            first.call("list")
        known = {e.key: e for e in first.rec.of(StateChanged)}
        second = qcg(known=known, previous_address=address)
        assert (second.session.address, second.session.instance_id) == (address, instance)
        assert second.session.service_pid == pid
        assert second.call("status", "long")["jobs"]["long"]["data"]["status"] == "EXECUTING"
        assert second.rec.of(Resynced)[0].changed == 0, [show(e) for e in second.rec.events]
        second.call("cancel", "long")
        second.rec.wait_for(reached("long", State.CANCELLED), 15, "long cancelled through the adopting session")
        assert all(wait_pid_gone(p, 5) for p in sleeper)


@pytest.mark.qcg
@pytest.mark.timeout(90)
class TestPersistedSpecs:
    """The specs a session submitted live in ``<wd>/.flowbus/specs.json``, so the next incarnation
    can resubmit them."""

    def test_adopting_session_resubmits_job_of_killed_incarnation(self, qcg: Callable[..., Running],
                                                                  tmp_path: Path) -> None:
        """A SIGKILLed owner's failed job is resubmitted by the session that adopts its manager,
        which finds the spec file through the manager's working directory (its own wd differs)."""
        flag = tmp_path / "ran-once"
        script = textwrap.dedent(f"""
            import json, os, signal, time
            from flowbus.schemas import QcgSessionConfig
            from flowbus.services.qcg import QcgSession
            s = QcgSession(QcgSessionConfig(name="q0", wd={str(tmp_path / 'prev')!r}))
            s.start(lambda ev: None, {{}})
            s.call("submit", [{{"name": "flaky", "exec": "/bin/sh",
                                "args": ["-c", "if [ -e {flag} ]; then exit 0; fi; touch {flag}; exit 1"]}}])
            deadline = time.monotonic() + 20
            while s.call("status", "flaky")["jobs"]["flaky"]["data"]["status"] != "FAILED":
                assert time.monotonic() < deadline, "flaky did not fail"
                time.sleep(0.05)
            print(json.dumps({{"address": s.address, "pid": s.service_pid, "id": s.instance_id}}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        out, err = tmp_path / "prev.out", tmp_path / "prev.err"
        with out.open("w") as fout, err.open("w") as ferr:  # not pipes: the orphaned manager inherits them
            code = subprocess.run([sys.executable, "-c", script], stdout=fout, stderr=ferr, timeout=40).returncode
        assert code == -signal.SIGKILL, err.read_text()[-2000:]
        prev = json.loads(out.read_text().strip().splitlines()[-1])
        service = psutil.Process(prev["pid"])
        try:
            saved = json.loads((tmp_path / "prev" / ".flowbus" / "specs.json").read_text())
            assert [spec["name"] for spec in saved["specs"]] == ["flaky"]
            run = qcg(previous_address=prev["address"])
            assert run.session.instance_id == prev["id"] and run.session.service_pid == prev["pid"]
            assert run.rec.states("flaky")[-1].state is State.ABORTED
            mark = len(run.rec.states("flaky"))
            assert run.call("resubmit", "flaky") == ["flaky"]
            assert run.rec.states("flaky")[mark].state is State.QUEUED
            run.rec.wait_for(lambda evs: next((e for e in run.rec.states("flaky")[mark:]
                                               if e.state is State.COMPLETE), None), 15, "flaky complete")
            run.session.stop()
            assert wait_pid_gone(prev["pid"], 5), "adopted manager still running after stop()"
            assert not (tmp_path / "prev" / ".flowbus" / "specs.json").exists(), "stop() finished every job"
        finally:
            if not pid_gone(service.pid):
                service.kill()

    def test_new_manager_gets_unfinished_jobs_of_dead_incarnation(self, qcg: Callable[..., Running],
                                                                  tmp_path: Path) -> None:
        """Session and manager both die: the next session (same wd, recovery resubmit) starts a
        manager, reports the running job LOST, then resubmits it from the saved spec; a finished
        job is not rerun and a removed one is not resubmitted."""
        flag = tmp_path / "started-once"
        wd = str(tmp_path / "shared")
        first = qcg(wd=wd, recovery="resubmit")
        first.call("submit", [{"name": "done", "exec": "/bin/true"}, {"name": "gone", "exec": "/bin/true"}])
        first.rec.wait_for(reached("gone", State.COMPLETE), 15, "gone complete")
        first.rec.wait_for(reached("done", State.COMPLETE), 15, "done complete")
        assert first.call("remove", "gone") == {"removed": 1}
        first.call("submit", [{"name": "long", "exec": "/bin/sh", "after": ["done"],
                               "args": ["-c", f"if [ -e {flag} ]; then exit 0; fi; touch {flag}; sleep 60"]}])
        first.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        first.stop.set()
        assert first.thread is not None
        first.thread.join(5)
        address, pid = first.session.address, first.session.service_pid
        assert pid is not None
        first.session.kill()  # the actor and its manager die together
        assert wait_pid_gone(pid, 5)
        known = {e.key: e for e in first.rec.of(StateChanged)}
        second = qcg(known=known, previous_address=address, wd=wd, recovery="resubmit")
        assert second.session.instance_id != first.rec.of(Connected)[0].detail
        lost = second.rec.wait_for(reached("long", State.UNKNOWN), 5, "long lost")
        assert lost.native == "LOST"
        resub = [e for e in second.rec.of(RecoveryAttempted) if e.action == "resubmit"]
        assert [(e.key, e.ok) for e in resub] == [("long", True)], [show(e) for e in second.rec.events]
        done = second.rec.wait_for(reached("long", State.COMPLETE), 20, "long complete after resubmit")
        assert second.rec.index(lost) < second.rec.index(done)
        assert second.rec.states("done") == [] and second.rec.states("gone") == []

    def test_corrupt_spec_file_is_reported_and_ignored(self, qcg: Callable[..., Running], tmp_path: Path) -> None:
        """A spec file that is not JSON is logged as an error naming it; start() works, no job
        is resubmitted, and the next submit replaces the file with a valid one."""
        wd = tmp_path / "corrupt"
        path = wd / ".flowbus" / "specs.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"{not json")
        known = {"long": StateChanged(source="q0", backend="qcg", key="long", state=State.ACTIVE, native="EXECUTING")}
        with capture_logs() as logs:
            run = qcg(known=known, wd=str(wd), recovery="resubmit")
        errors = [e for e in logs if e["event"] == "qcg.specs.corrupt"]
        assert errors and errors[0]["file"] == str(path) and errors[0]["log_level"] == "error", logs
        assert isinstance(run.rec.events[0], Connected)
        assert [e.native for e in run.rec.states("long")] == ["LOST"]
        assert run.rec.of(RecoveryAttempted) == []
        with pytest.raises(BackendRejected, match="spec of job 'long' is unknown"):
            run.call("resubmit", "long")
        run.call("submit", [{"name": "next", "exec": "/bin/true"}])
        assert [s["name"] for s in json.loads(path.read_text())["specs"]] == ["next"]


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestIsolation:
    def test_service_listens_on_loopback_only(self, qcg: Callable[..., Running]) -> None:
        """The QCG service process binds its REP and PUB sockets on 127.0.0.1 only."""
        run = qcg()
        assert run.session.address.startswith("tcp://127.0.0.1:")
        pid = run.session.service_pid
        assert pid is not None
        listening = [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert len(listening) >= 2, listening
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}

    def test_is_a_backend_session(self, qcg: Callable[..., Running]) -> None:
        """QcgSession satisfies the BackendSession protocol and stop() is idempotent."""
        run = qcg()
        assert isinstance(run.session, BackendSession)
        assert run.session.name == "q0" and run.session.backend == "qcg"
        run.stop.set()
        run.session.stop()
        run.session.stop()
        assert isinstance(run.rec.events[-1], Disconnected) and run.rec.events[-1].reason == "stopped"
        with pytest.raises(BackendUnavailable):
            run.call("list")


    def test_exit_without_stop_does_not_hang(self, tmp_path: Path) -> None:
        """A process that exits without stop() still exits, and takes its manager and jobs along."""
        script = textwrap.dedent(f"""
            import json, time
            import psutil
            from flowbus.schemas import QcgSessionConfig
            from flowbus.services.qcg import QcgSession
            s = QcgSession(QcgSessionConfig(name="careless", wd={str(tmp_path / 'careless')!r}))
            s.start(lambda ev: None, {{}})
            s.call("submit", [{{"name": "long", "exec": "/bin/sleep", "args": ["30"]}}])
            while s.call("status", "long")["jobs"]["long"]["data"]["status"] != "EXECUTING":
                time.sleep(0.02)
            jobs = [p.pid for p in psutil.Process(s.service_pid).children(recursive=True)]
            print(json.dumps({{"pid": s.service_pid, "jobs": jobs}}), flush=True)
        """)
        out = tmp_path / "careless.out"
        with out.open("w") as fout:  # not a pipe: a surviving manager would hold it open
            code = subprocess.run([sys.executable, "-c", script], stdout=fout, stderr=subprocess.STDOUT,
                                  timeout=30).returncode
        assert code == 0, out.read_text()[-2000:]
        prev = next(json.loads(line) for line in out.read_text().splitlines() if line.startswith("{"))
        assert prev["jobs"], "the job was not running"
        assert all(wait_pid_gone(p, 5) for p in [prev["pid"], *prev["jobs"]])


class TestJobBook:
    def test_push_never_goes_back_but_poll_does(self) -> None:
        """Publisher events cannot move a key backwards or out of a final state; polls can."""
        book = JobBook("s")
        assert book.change("j", Obs("EXECUTING"), Observed.PUSH) is not None
        assert book.change("j", Obs("SCHEDULED"), Observed.PUSH) is None
        assert book.change("j", Obs("SUCCEED"), Observed.PUSH) is not None
        assert book.change("j", Obs("FAILED"), Observed.PUSH) is None
        assert book.change("j", Obs("SUCCEED"), Observed.POLL) is None
        ev = book.change("j", Obs("QUEUED"), Observed.POLL)
        assert ev is not None and ev.previous is State.COMPLETE

    def test_resubmission_drops_succeeded_dependencies(self) -> None:
        """Unfinished specs are resubmitted in order; after= on succeeded jobs is dropped."""
        book = JobBook("s")
        book.record([{"name": "a", "exec": "x"}, {"name": "b", "exec": "x", "after": "a"},
                     {"name": "c", "exec": "x", "after": ["a", "b"]}])
        book.submitted(["a", "b", "c"])
        book.change("a", Obs("SUCCEED"), Observed.PUSH)
        plan = book.resubmission()
        assert [s["name"] for s in plan] == ["b", "c"]
        assert "after" not in plan[0] and plan[1]["after"] == ["b"]

    def test_diff_marks_missing_unfinished_as_lost(self) -> None:
        """A complete snapshot without an unfinished key yields LOST; iterations follow their parent."""
        book = JobBook("s")
        book.change("p:0", Obs("EXECUTING"), Observed.PUSH)
        book.change("q", Obs("SUCCEED"), Observed.PUSH)
        events = book.diff(Snapshot(parents=set(), obs={}), Observed.RESYNC, "gone")
        assert [(e.key, e.native, e.attrs.get("parent")) for e in events] == [("p:0", "LOST", "p")]
