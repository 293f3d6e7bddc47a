"""SomaSession against real soma-workflow 6.0.13 controllers (light mode, real job processes).

Every test is bounded; the fixture stops each session and checks that no soma thread and no
job process is left. The last class hosts a session in a real BackendActor on Ray.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import psutil
import pytest

from flowbus.schemas import (
    BackendRejected,
    BackendUnavailable,
    ConfigError,
    Connected,
    Disconnected,
    Observed,
    RecoveryAttempted,
    RecoveryGaveUp,
    Resynced,
    SomaSessionConfig,
    State,
    StateChanged,
    UnknownOperation,
    parse_config,
)
from flowbus.services import BackendSession
from flowbus.services.soma import SomaSession
from support import poll
from support import soma as _fx
from support.recorder import Recorder
from support.soma import Running, latest, live_children, soma_threads

soma_session = _fx.soma_session
Session = Callable[..., Running]


def chain(name: str = "chain", n: int = 3) -> dict[str, Any]:
    jobs = [{"name": f"j{i}", "command": ["echo", f"step {i}"], "after": [f"j{i - 1}"] if i else []} for i in range(n)]
    return {"name": name, "jobs": jobs}


def plain_ok(value: Any) -> None:
    """Results cross Ray and the CLI: msgpack must take them as they are."""
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(value)) is not None or value is None


class TestObservation:
    """Job and workflow states of real workflows reach emit as StateChanged events."""

    @pytest.mark.timeout(90)
    def test_chain_completes_in_order(self, soma_session: Session) -> None:
        """A 3-job chain: every job goes to COMPLETE (native done, exit value 0) in dependency order, then the workflow."""
        run = soma_session()
        assert isinstance(run.session, BackendSession)
        wf = run.call("submit_workflow", chain())
        assert isinstance(wf, int)
        done = run.final(str(wf))
        assert done.state is State.COMPLETE and done.native == "workflow_done" and done.observed is Observed.POLL
        last = latest(run.rec)
        for i in range(3):
            ev = last[f"{wf}/j{i}"]
            assert (ev.state, ev.native) == (State.COMPLETE, "done")
            assert ev.attrs["exit_status"] == "finished_regularly" and ev.attrs["exit_value"] == 0
        finals = [e for e in run.rec.of(StateChanged) if e.state.final and "/" in e.key]
        assert [e.key for e in finals] == [f"{wf}/j0", f"{wf}/j1", f"{wf}/j2"]
        assert run.rec.index(finals[-1]) < run.rec.index(done)
        # no final state is published before soma wrote the exit information
        assert all(e.attrs.get("exit_status") is not None for e in finals)
        first = run.rec.states(f"{wf}/j2")[0]
        assert first.state is State.QUEUED and first.native == "not_submitted"
        assert run.call("workflow_status", wf) == "workflow_done"
        assert run.call("workflow_status", f"{wf}/j1") == "workflow_done"  # an event key names its workflow
        ids = run.call("job_ids", wf)
        assert sorted(ids) == ["j0", "j1", "j2"]
        assert run.call("job_status", ids["j1"]) == "done"
        assert run.call("job_termination_status", ids["j1"])[:2] == ["finished_regularly", 0]
        out = run.call("retrieve_job_stdouterr", ids["j2"])
        assert out["stdout"] == "step 2\n"

    @pytest.mark.timeout(90)
    def test_nonzero_exit_is_aborted_with_exit_info(self, soma_session: Session) -> None:
        """exit 1 is ABORTED (soma's native 'done' and the exit value beside it); the job after it never runs."""
        run = soma_session()
        wf = run.call("submit_workflow", {"name": "f", "jobs": [
            {"name": "ok", "command": ["true"]},
            {"name": "bad", "command": ["sh", "-c", "exit 1"], "after": ["ok"]},
            {"name": "after", "command": ["true"], "after": ["bad"]}]})
        assert run.final(str(wf)).state is State.ABORTED
        last = latest(run.rec)
        bad = last[f"{wf}/bad"]
        assert (bad.state, bad.native, bad.detail) == (State.ABORTED, "done", "exit value 1")
        assert bad.attrs["exit_status"] == "finished_regularly" and bad.attrs["exit_value"] == 1
        assert bad.attrs["signal"] is None
        after = last[f"{wf}/after"]
        assert (after.state, after.native) == (State.CANCELLED, "failed")
        assert after.attrs["exit_status"] == "aborted_before_running"
        assert last[f"{wf}/ok"].state is State.COMPLETE
        assert last[str(wf)].attrs["failed"] == 2
        ids = run.call("job_ids", wf)
        assert run.call("list_failed_jobs", wf) == [ids["bad"]]
        assert sorted(run.call("list_failed_jobs", wf, include_aborted_jobs=True)) == sorted([ids["bad"], ids["after"]])

    @pytest.mark.timeout(120)
    def test_restart_after_failure(self, soma_session: Session, tmp_path: Path) -> None:
        """restart_workflow re-runs the failed job and what depends on it; both then complete."""
        flag = tmp_path / "flag"
        run = soma_session()
        wf = run.call("submit_workflow", {"name": "r", "jobs": [
            {"name": "flaky", "command": ["test", "-e", str(flag)]},
            {"name": "next", "command": ["true"], "after": ["flaky"]}]})
        assert run.final(str(wf)).state is State.ABORTED
        flag.touch()
        n = len(run.rec.events)
        assert run.call("restart_workflow", wf) is True
        done = run.rec.wait_for(lambda ev: next((e for e in ev[n:] if isinstance(e, StateChanged) and e.key == str(wf)
                                                 and e.state.final), None), 60, "the restarted workflow's end")
        assert done.state is State.COMPLETE
        assert latest(run.rec)[f"{wf}/flaky"].state is State.COMPLETE
        assert latest(run.rec)[f"{wf}/next"].state is State.COMPLETE

    @pytest.mark.timeout(120)
    def test_stop_and_delete_workflow(self, soma_session: Session) -> None:
        """stop_workflow kills a running job (CANCELLED, process gone); delete_workflow removes the keys."""
        run = soma_session()
        wf = run.call("submit_workflow", {"name": "s", "jobs": [{"name": "long", "command": ["sleep", "60"]},
                                                               {"name": "later", "command": ["true"], "after": ["long"]}]})
        run.state(f"{wf}/long", lambda e: e.state is State.ACTIVE, what="long running")
        pid = poll.until(lambda: next(iter(run.session._pids.values()), None), 10, "the job's pid")[0]
        assert psutil.Process(pid).cmdline()[:2] == ["sleep", "60"]
        assert run.call("stop_workflow", wf) is True
        long = run.final(f"{wf}/long")
        assert long.state is State.CANCELLED and long.native == "failed"
        assert run.final(str(wf)).state is State.CANCELLED
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert run.call("delete_workflow", wf) is True
        gone = run.state(str(wf), lambda e: e.native == "", what="workflow gone")
        assert gone.state is State.UNKNOWN and gone.detail == "workflow deleted"
        assert run.state(f"{wf}/later", lambda e: e.native == "").state is State.UNKNOWN
        with pytest.raises(BackendRejected, match=f"workflow id {wf} is not valid"):
            run.call("workflow_status", wf)

    @pytest.mark.timeout(90)
    def test_soma_json_form_and_helpers(self, soma_session: Session, tmp_path: Path) -> None:
        """soma's own JSON form (Helper.serialize) is accepted; retrieval results are plain msgpack data."""
        run = soma_session()
        path = tmp_path / "wf.json"
        soma_form = run.call("serialize", chain("fromsoma", 2), str(path))
        assert path.exists() and "serialized_jobs" in soma_form
        wf = run.call("submit", str(path))
        with pytest.raises(BackendRejected, match=r"cannot read workflow file '/no/such.json'"):
            run.call("submit", "/no/such.json")
        assert run.final(str(wf)).state is State.COMPLETE
        assert run.call("wait_workflow", wf, timeout=5) == "workflow_done"
        ids = run.call("job_ids", wf)
        assert run.call("wait_job", list(ids.values()), timeout=5) == {str(i): "done" for i in ids.values()}
        for op, args in [("workflows", ()), ("workflow", (wf,)), ("jobs", ()), ("transfers", ()),
                         ("workflow_elements_status", (wf,)), ("serialize", (wf,))]:
            plain_ok(run.call(op, *args))
        assert str(wf) in run.call("workflows")
        info = run.call("workflow", wf)
        assert info["name"] == "fromsoma" and [j["name"] for j in info["jobs"]] == ["j0", "j1"]
        assert info["dependencies"] == [[ids["j0"], ids["j1"]]]
        assert run.call("change_workflow_expiration_date", wf, "2099-01-01T00:00:00") is True
        assert run.call("workflows", [wf])[str(wf)][1].startswith("2099-01-01")
        tr = run.call("register_transfer", True, str(path))
        plain_ok(tr)
        assert isinstance(run.call("transfer_status", tr["transfer_id"]), list)
        run.call("delete_transfer", tr["transfer_id"])
        assert run.call("delete_all_workflows") is True
        assert run.call("workflows") == {}


    @pytest.mark.timeout(90)
    def test_soma_form_with_barrier_job(self, soma_session: Session) -> None:
        """A soma workflow built with soma's own classes (a BarrierJob between two jobs) runs from its JSON form."""
        from soma_workflow.client import BarrierJob, Job, Workflow

        from flowbus.services.soma._wf import serialize

        a, bar, c = Job(command=["true"], name="a"), BarrierJob(name="bar"), Job(command=["true"], name="c")
        run = soma_session()
        wf = run.call("submit_workflow", serialize(Workflow([a, bar, c], dependencies=[(a, bar), (bar, c)], name="bw")))
        assert run.final(str(wf)).state is State.COMPLETE
        assert {k: e.state for k, e in latest(run.rec).items()} == {
            str(wf): State.COMPLETE, f"{wf}/a": State.COMPLETE, f"{wf}/bar": State.COMPLETE, f"{wf}/c": State.COMPLETE}


class TestStateMapping:
    """soma's (status, exit info) pairs map onto normalised states; missing exit info is not final."""

    @pytest.mark.parametrize(("status", "exit_info", "state"), [
        ("not_submitted", None, State.QUEUED), ("undetermined", None, State.SUBMITTED),
        ("queued_active", None, State.SUBMITTED), ("running", None, State.ACTIVE),
        ("done", ("finished_regularly", 0, None, None), State.COMPLETE),
        ("done", ("finished_regularly", 3, None, None), State.ABORTED),
        ("done", ("finished_signal", None, "SIGKILL", None), State.ABORTED),
        ("failed", ("killed_by_user", None, None, None), State.CANCELLED),
        ("failed", ("aborted_before_running", None, None, None), State.CANCELLED),
        ("failed", ("aborted", None, None, None), State.ABORTED),
        ("done", (None, None, None, None), None), ("failed", None, None),
        ("warning", None, State.UNKNOWN), ("user_on_hold", None, State.SUSPENDED),
    ])
    def test_job_state(self, status: str, exit_info: Any, state: State | None) -> None:
        """Each pair gives its state; done/failed without exit information gives None (held back)."""
        from flowbus.services.soma._wf import job_state

        assert job_state(status, exit_info)[0] is state


class TestResync:
    """start() compares the controller with what the bus knew and publishes only the differences."""

    @pytest.mark.timeout(120)
    def test_known_states_resync(self, soma_session: Session, tmp_path: Path) -> None:
        """A second session on the same directory: equal states are silent, differences and unknown keys are resync events."""
        first = soma_session()
        wf = first.call("submit_workflow", chain("k", 2))
        first.final(str(wf))
        known = latest(first.rec)
        first.stop_polling()
        first.session.stop()
        stale = msgspec.structs.replace(known[f"{wf}/j1"], state=State.ACTIVE, native="running")
        ghost = StateChanged(source="s1", backend="soma", key="999/x", state=State.ACTIVE, native="running")
        again = soma_session(known={**known, f"{wf}/j1": stale, "999/x": ghost},
                             directory=first.session.config.directory)
        resynced = again.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, Resynced)), None), 10, "Resynced")
        states = again.rec.of(StateChanged)
        assert {e.key for e in states} == {f"{wf}/j1", "999/x"}
        assert all(e.observed is Observed.RESYNC for e in states)
        assert latest(again.rec)[f"{wf}/j1"].state is State.COMPLETE
        assert latest(again.rec)["999/x"].state is State.UNKNOWN
        assert resynced.changed == 2 and resynced.resources == 3
        assert isinstance(again.rec.events[0], Connected) and again.rec.events[0].address == str(tmp_path / "soma0")


def _break(run: Running, how: str = "stop_loop") -> None:
    """Break the controller: stop its engine loop, drop its engine (``stop_engine``), or crash the
    engine thread the way soma does after a restart on an unknown scheduler id (a KeyError in
    ``get_job_exit_info``)."""
    built = run.session._built
    assert built is not None and built.engine is not None
    if how == "stop_loop":
        built.engine.engine_loop.stop_loop()
    elif how == "stop_engine":
        built.controller.stop_engine()
    else:
        sched = built.scheduler

        def crash(drmaa_id: str) -> Any:
            raise KeyError(drmaa_id)

        sched.get_job_exit_info = crash
        for proc in built.job_procs().values():  # a job ends: the engine asks for its exit info
            proc.kill()


def _restartable(flag: Path) -> list[str]:
    """First run: leave a flag and sleep; a re-run finds the flag and exits 0."""
    return ["sh", "-c", f'if [ -e "{flag}" ]; then exit 0; fi; touch "{flag}"; sleep 60']


class TestRecovery:
    """A dead controller is replaced; orphaned jobs are killed by PID; workflows come back."""

    @pytest.mark.timeout(150)
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
    # stop_engine stops the engine loop before it drops the engine: a poll in between sees a stopped loop
    @pytest.mark.parametrize(("how", "reason"), [("stop_loop", "engine loop was stopped"),
                                                 ("stop_engine", "stop_engine was called|engine loop was stopped"),
                                                 ("crash", "is dead")])
    def test_reattach(self, soma_session: Session, tmp_path: Path, how: str, reason: str) -> None:
        """Default recovery: new controller on the same directory, the orphaned job killed, the workflow restarted to completion."""
        flag = tmp_path / "flag"
        run = soma_session()
        assert run.session.config.recovery == "reattach"
        wf = run.call("submit_workflow", {"name": "rec", "jobs": [{"name": "a", "command": _restartable(flag)},
                                                                 {"name": "b", "command": ["true"], "after": ["a"]}]})
        run.state(f"{wf}/a", lambda e: e.state is State.ACTIVE, what="a running")
        pid = poll.until(lambda: next(iter(run.session._pids.values()), None), 10, "a's pid")[0]
        old_threads = run.session.engine_threads
        _break(run, how)
        lost = run.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, Disconnected)), None), 30, "Disconnected")
        assert lost.will_retry and any(r in lost.reason for r in reason.split("|")), lost.reason
        att = run.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, RecoveryAttempted)
                                                and e.key == str(wf)), None), 60, "workflow recovery")
        assert att.action == "reattach" and att.ok
        new = next(e for e in run.rec.of(RecoveryAttempted) if e.action == "new_controller")
        assert new.ok and (how == "crash" or str(pid) in new.detail)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert len(run.rec.of(Connected)) == 2
        assert all(not t.is_alive() for t in old_threads)
        done = run.final(str(wf), 90)
        assert done.state is State.COMPLETE
        assert latest(run.rec)[f"{wf}/a"].state is State.COMPLETE
        # the session works on: a new workflow runs on the new controller
        wf2 = run.call("submit_workflow", chain("after", 1))
        assert run.final(str(wf2)).state is State.COMPLETE

    @pytest.mark.timeout(150)
    def test_resubmit(self, soma_session: Session, tmp_path: Path) -> None:
        """recovery = resubmit: the old workflow is deleted (keys UNKNOWN) and resubmitted under a new id that completes."""
        flag = tmp_path / "flag"
        run = soma_session(recovery="resubmit")
        wf = run.call("submit_workflow", {"name": "rs", "jobs": [{"name": "a", "command": _restartable(flag)}]})
        run.state(f"{wf}/a", lambda e: e.state is State.ACTIVE, what="a running")
        pid = poll.until(lambda: next(iter(run.session._pids.values()), None), 10, "a's pid")[0]
        _break(run)
        att = run.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, RecoveryAttempted)
                                                and e.key == str(wf)), None), 60, "workflow recovery")
        assert att.action == "resubmit" and att.ok
        new_id = int(att.detail.rsplit(" ", 1)[1])
        assert new_id != wf
        assert run.state(str(wf), lambda e: e.native == "").state is State.UNKNOWN
        assert run.final(str(new_id), 90).state is State.COMPLETE
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert sorted(run.call("workflows")) == [str(new_id)]

    @pytest.mark.timeout(90)
    def test_recovery_none_reports_and_refuses(self, soma_session: Session, tmp_path: Path) -> None:
        """recovery = none: Disconnected (no retry) and RecoveryGaveUp; calls then fail as BackendUnavailable."""
        run = soma_session(recovery="none")
        wf = run.call("submit_workflow", {"name": "n", "jobs": [{"name": "a", "command": ["sleep", "60"]}]})
        run.state(f"{wf}/a", lambda e: e.state is State.ACTIVE, what="a running")
        _break(run)
        gave = run.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, RecoveryGaveUp)), None), 30, "gave up")
        assert "recovery disabled" in gave.reason
        assert not run.rec.of(Disconnected)[0].will_retry
        with pytest.raises(BackendUnavailable, match=r"^workflows: session 's0' gave up reconnecting \(.*engine loop"):
            run.call("workflows")
        assert run.session.phase == "dead"

    @pytest.mark.timeout(150)
    def test_next_incarnation_recovers_orphans(self, soma_session: Session, tmp_path: Path) -> None:
        """A session that vanished (its engine stopped, no stop()) left a job running: the next session on the
        directory kills it by its recorded PID and restarts the workflow."""
        flag = tmp_path / "flag"
        first = soma_session()
        wf = first.call("submit_workflow", {"name": "inc", "jobs": [{"name": "a", "command": _restartable(flag)}]})
        first.state(f"{wf}/a", lambda e: e.state is State.ACTIVE, what="a running")
        pid = poll.until(lambda: next(iter(first.session._pids.values()), None), 10, "a's pid")[0]
        first.stop_polling()
        built = first.session._built
        assert built is not None
        built.engine.engine_loop.stop_loop()  # the engine is gone; the job runs on, as after a crash
        poll.until(lambda: not built.threads[0].is_alive(), 10, "the engine thread to end")
        assert psutil.pid_exists(pid)
        second = soma_session(directory=first.session.config.directory)
        att = next(e for e in second.rec.of(RecoveryAttempted) if e.key == str(wf))
        assert att.action == "reattach" and att.ok
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert second.final(str(wf), 90).state is State.COMPLETE
        first.session.kill()


    @pytest.mark.timeout(150)
    def test_release_leaves_jobs_and_workflows_to_the_next_incarnation(self, soma_session: Session,
                                                                         tmp_path: Path) -> None:
        """release() ends soma's threads in this process and publishes nothing, but the job
        process runs on and the workflow stays; the next session on the directory adopts it
        (kills the recorded job, restarts the workflow to completion)."""
        flag = tmp_path / "flag"
        first = soma_session()
        wf = first.call("submit_workflow", {"name": "rel", "jobs": [{"name": "a", "command": _restartable(flag)}]})
        first.state(f"{wf}/a", lambda e: e.state is State.ACTIVE, what="a running")
        pid = poll.until(lambda: next(iter(first.session._pids.values()), None), 10, "a's pid")[0]
        threads = first.session.engine_threads
        first.stop_polling()  # the host stops polling a fenced session before it releases it
        mark = len(first.rec.events)
        first.session.release()
        first.session.release()
        first.session.stop()
        first.session.kill()
        assert len(first.rec.events) == mark, first.rec.events[mark:]
        assert threads and all(not t.is_alive() for t in threads), "soma threads still running"
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, "release killed the job"
        with pytest.raises(BackendUnavailable):
            first.call("workflows")
        second = soma_session(directory=first.session.config.directory, known=latest(first.rec))
        assert str(wf) in second.call("workflows")
        att = next(e for e in second.rec.of(RecoveryAttempted) if e.key == str(wf))
        assert att.action == "reattach" and att.ok
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert second.final(str(wf), 90).state is State.COMPLETE
        assert len(first.rec.events) == mark


class TestBadInput:
    """Bad descriptions, ids and operations get errors naming the problem; the session goes on."""

    @pytest.mark.timeout(90)
    def test_errors_then_work_goes_on(self, soma_session: Session) -> None:
        """Every bad call raises a clear error; afterwards a good workflow runs and polling still emits."""
        run = soma_session()
        bad: list[tuple[tuple[Any, ...], dict[str, Any], type[Exception], str]] = [
            (("submit_workflow", {"name": "x", "jobs": []}), {}, BackendRejected, "has no jobs"),
            (("submit_workflow", {"name": "x", "jobs": [{"name": "a", "command": []}]}), {}, BackendRejected,
             "empty command"),
            (("submit_workflow", {"name": "x", "jobs": [{"name": "a", "command": ["true"], "after": ["zz"]}]}), {},
             BackendRejected, "unknown job 'zz'"),
            (("submit_workflow", {"name": "x", "jobs": [{"name": "a", "command": ["true"], "after": ["b"]},
                                                       {"name": "b", "command": ["true"], "after": ["a"]}]}), {},
             BackendRejected, "cycle"),
            (("submit_workflow", {"name": "x", "jobs": [{"name": "a", "command": ["true"], "bogus": 1}]}), {},
             BackendRejected, "bogus"),
            (("submit_workflow", "{not json"), {}, BackendRejected, "not valid JSON"),
            (("submit_workflow", 42), {}, BackendRejected, "must be a mapping"),
            (("submit_workflow", {"serialized_jobs": {"0": {}}, "jobs": [0]}), {}, BackendRejected,
             "not a valid soma-workflow workflow"),
            (("workflow_status", 12345), {}, BackendRejected, "workflow id 12345 is not valid"),
            (("workflow_status", "abc"), {}, BackendRejected, "workflow_id must be an integer"),
            (("job_status", 99999), {}, BackendRejected, "99999"),
            (("stop_workflow", 777), {}, BackendRejected, "777"),
            (("delete_workflow", 777), {}, BackendRejected, "777"),
            (("restart_workflow", 777), {}, BackendRejected, "777"),
            (("wait_workflow", 1), {"timeout": -1}, BackendRejected, "timeout"),
            (("change_workflow_expiration_date", 1, "tomorrow"), {}, BackendRejected, "ISO 8601"),
            (("no_such_op",), {}, UnknownOperation, "unknown operation 'no_such_op'"),
            (("workflow_status",), {}, BackendRejected, "missing a required argument"),
        ]
        for args, kwargs, exc, text in bad:
            with pytest.raises(exc) as info:
                run.call(*args, **kwargs)
            assert str(info.value).startswith("session 's0': "), (args, str(info.value))
            if text:
                assert text in str(info.value), (args, str(info.value))
        n = len(run.rec.events)
        wf = run.call("submit_workflow", chain("good", 2))
        done = run.rec.wait_for(lambda ev: next((e for e in ev[n:] if isinstance(e, StateChanged) and e.key == str(wf)
                                                 and e.state.final), None), 60, "the good workflow's end")
        assert done.state is State.COMPLETE
        assert not run.errors


class TestLifecycle:
    """stop() leaves no thread and no process; configuration is checked."""

    @pytest.mark.timeout(90)
    def test_stop_kills_running_jobs_and_threads(self, tmp_path: Path) -> None:
        """A graceful stop with a job running: the job is killed (final state published), soma's threads end, no child is left."""
        threads_before = {t.ident for t in threading.enumerate()}
        children_before = live_children()
        rec = Recorder()
        s = SomaSession(SomaSessionConfig(name="st", poll_interval=0.05, engine_refresh=0.05))
        s.start(rec, {})
        assert len(soma_threads()) == 3
        directory = s.address
        assert os.path.isdir(directory)
        wf = s.call("submit_workflow", {"name": "st", "jobs": [{"name": "a", "command": ["sleep", "60"]}]})
        poll.until(lambda: (s.poll(), s._pids)[1], 30, "the job to run")
        (pid, _), = s._pids.values()
        s.stop()
        s.stop()  # idempotent
        s.kill()
        assert soma_threads() == []
        assert {t.ident for t in threading.enumerate()} - threads_before == set()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert live_children() - children_before == set()
        last = latest(rec)
        assert last[f"{wf}/a"].state.final and last[str(wf)].state.final
        assert isinstance(rec.events[-1], Disconnected) and rec.events[-1].reason == "stopped"
        assert not os.path.exists(directory)  # the session created it, the session removed it
        with pytest.raises(BackendUnavailable):
            s.call("workflows")

    @pytest.mark.timeout(90)
    def test_resource_mode_with_config_file(self, soma_session: Session, tmp_path: Path) -> None:
        """mode = resource: a soma configuration file naming a light-mode resource; workflows run the same."""
        cfg_file = tmp_path / "soma.cfg"
        swf_dir = tmp_path / "swf"
        cfg_file.write_text(f"[myres]\nLIGHT_MODE = 1\nSOMA_WORKFLOW_DIR = {swf_dir}\n"
                            f"DATABASE_FILE = {swf_dir / 'db.sqlite'}\nTRANSFERED_FILES_DIR = {swf_dir / 'tr'}\n")
        run = soma_session(mode="resource", resource_id="myres", config_file=str(cfg_file), directory="")
        assert cast(Connected, run.rec.events[0]).address == "resource:myres"
        wf = run.call("submit_workflow", chain("res", 2))
        assert run.final(str(wf)).state is State.COMPLETE
        assert any(p.name.startswith("db") for p in swf_dir.iterdir())

    @pytest.mark.timeout(60)
    def test_start_failure_is_clear_and_leaves_nothing(self, tmp_path: Path) -> None:
        """A controller that cannot be built (its directory cannot be made): start() returns with the session
        down, Disconnected (will retry) and call errors name the session and the cause, nothing is left running,
        and once the cause is gone a later poll builds the controller."""
        threads_before = {t.ident for t in threading.enumerate()}
        children_before = live_children()
        blocker = tmp_path / "file"
        blocker.write_text("x")
        rec = Recorder()
        s = SomaSession(SomaSessionConfig(name="bad", directory=str(blocker / "sub"), poll_interval=0.05,
                                          engine_refresh=0.05, recovery_backoff=0.05))
        s.start(rec, {})
        assert s.phase == "down"
        (down,) = rec.events
        assert isinstance(down, Disconnected) and down.will_retry and down.source == "bad"
        assert down.reason.startswith("session 'bad': cannot start a soma WorkflowController"), down.reason
        assert str(blocker / "sub") in down.reason, down.reason
        with pytest.raises(BackendUnavailable,
                           match=r"session 'bad' is disconnected \(session 'bad': cannot start a soma WorkflowController"):
            s.call("workflows")
        assert soma_threads() == []
        assert {t.ident for t in threading.enumerate()} - threads_before == set()
        assert live_children() - children_before == set()
        # the cause goes away: a poll the backoff allows builds the controller
        blocker.unlink()
        poll.until(lambda: (s.poll(), s.phase == "up")[1], 30, "the session to reconnect")
        assert [type(e) for e in rec.events] == [Disconnected, RecoveryAttempted, Connected, RecoveryAttempted,
                                                 Resynced]
        assert [e.action for e in rec.of(RecoveryAttempted)] == ["reconnect", "new_controller"]
        assert s.call("workflows") == {}
        s.stop()
        s.kill()
        assert soma_threads() == []
        assert {t.ident for t in threading.enumerate()} - threads_before == set()
        assert live_children() - children_before == set()

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("recovery", ["reattach", "none"])
    def test_start_failure_gives_up_per_recovery_policy(self, tmp_path: Path,
                                                         recovery: Literal["reattach", "none"]) -> None:
        """A controller that never can be built: recovery-attempts failed reconnects, then RecoveryGaveUp;
        recovery = none gives up at once (Disconnected without retry). Calls then say the session gave up."""
        blocker = tmp_path / "file"
        blocker.write_text("x")
        rec = Recorder()
        s = SomaSession(SomaSessionConfig(name="bad", directory=str(blocker / "sub"), recovery=recovery,
                                          recovery_attempts=2, recovery_backoff=0.01, poll_interval=0.05))
        s.start(rec, {})
        poll.until(lambda: (s.poll(), s.phase == "dead")[1], 30, "the session to give up")
        down = rec.of(Disconnected)
        assert len(down) == 1 and down[0].will_retry is (recovery != "none")
        gave = rec.of(RecoveryGaveUp)
        assert len(gave) == 1 and gave[0].attempts == (2 if recovery != "none" else 0)
        assert "cannot start a soma WorkflowController" in gave[0].reason
        assert not rec.of(Connected)
        with pytest.raises(BackendUnavailable, match="session 'bad' gave up reconnecting"):
            s.call("workflows")
        assert soma_threads() == []
        s.stop()
        s.kill()

    def test_start_twice_and_operations(self, soma_session: Session) -> None:
        """A started session refuses a second start; operations() lists the controller and Helper calls."""
        run = soma_session(poll=False)
        with pytest.raises(BackendRejected, match="already started"):
            run.session.start(run.rec, {})
        ops = run.session.operations()
        for op in ("submit_workflow", "register_transfer", "workflow", "workflows", "jobs", "transfers",
                   "workflow_status", "workflow_elements_status", "job_status", "job_termination_status",
                   "transfer_status", "stop_workflow", "restart_workflow", "delete_workflow",
                   "change_workflow_expiration_date", "wait_workflow", "wait_job", "transfer_files",
                   "delete_transfer", "list_failed_jobs", "delete_all_workflows", "transfer_input_files",
                   "transfer_output_files", "serialize"):
            assert op in ops

    def test_config(self) -> None:
        """Kebab-case keys load; impossible combinations are ConfigErrors naming the key."""
        cfg = parse_config({"sessions": [{"backend": "soma", "name": "s", "directory": "/tmp/x",
                                          "poll-interval": 0.1, "engine-refresh": 0.2, "recovery": "resubmit",
                                          "recovery-attempts": 2}]})
        s = cfg.sessions[0]
        assert isinstance(s, SomaSessionConfig) and s.recovery == "resubmit" and s.engine_refresh == 0.2
        with pytest.raises(ConfigError, match="need mode = 'resource'"):
            parse_config({"sessions": [{"backend": "soma", "name": "s", "login": "me"}]})
        with pytest.raises(ConfigError, match="directory"):
            parse_config({"sessions": [{"backend": "soma", "name": "s", "mode": "resource", "directory": "/x"}]})
        with pytest.raises(ConfigError, match="recovery"):
            parse_config({"sessions": [{"backend": "soma", "name": "s", "recovery": "maybe"}]})


@pytest.mark.ray
class TestInActor:
    """A soma session hosted by a real BackendActor on Ray, observed through the bus."""

    @pytest.mark.timeout(300)
    def test_actor_runs_workflow_and_stops_cleanly(self, ray_local: str, broker_factory: Any, tmp_path: Path) -> None:
        """Workflow states reach the bus; a bad call fails and the next works; removing the session leaves no soma
        thread and no job process in the actor."""
        ray = pytest.importorskip("ray")
        from flowbus.actors import ACTOR_PREFIX, Supervisor
        from flowbus.bus import Client
        from flowbus.schemas import FlowbusConfig, RayConfig

        def _actor_probe(impl: Any) -> dict[str, Any]:
            """Runs inside the actor (a local function: Ray sends it by value): soma's threads and the worker's live child processes."""
            import threading as _t

            import psutil as _ps

            names = [f"{type(t).__name__}:{t.name}" for t in _t.enumerate()
                     if t.name in ("poll_thread", "scheduler_loop") or type(t).__name__ == "EngineLoopThread"]
            kids = [p.pid for p in _ps.Process().children(recursive=True) if p.status() != _ps.STATUS_ZOMBIE]
            return {"soma_threads": names, "children": kids, "threads": _t.active_count()}

        broker = broker_factory()
        cfg = FlowbusConfig(ray=RayConfig(namespace="flowbus-test"), sessions=[
            SomaSessionConfig(name="sm", actor="soma", directory=str(tmp_path / "soma"), poll_interval=0.05,
                              engine_refresh=0.05)])
        sup = Supervisor.remote(msgspec.json.encode(cfg), broker.address)
        client: Client | None = None
        try:
            assert ray.get(sup.start.remote(), timeout=120) == {"sm": "soma"}
            client = Client(broker.address)
            actor = ray.get_actor(ACTOR_PREFIX + "soma")
            with pytest.raises(Exception, match="unknown job 'nope'"):
                ray.get(actor.call.remote("sm", "submit_workflow", {"name": "x", "jobs": [
                    {"name": "a", "command": ["true"], "after": ["nope"]}]}), timeout=60)
            wf = ray.get(actor.call.remote("sm", "submit_workflow", chain("inactor", 2)), timeout=60)
            done = client.wait(f"soma/sm/state/{wf} state=complete", timeout=90)
            assert isinstance(done, StateChanged) and done.native == "workflow_done"
            j1 = client.wait(f"soma/sm/state/{wf}/j1 state=complete", timeout=10)
            assert cast(StateChanged, j1).attrs["exit_value"] == 0
            # a transfer's states reach the bus and its snapshot (what `flowbus status` shows) like a job's
            (tmp_path / "t.txt").write_text("t\n")
            tid = ray.get(actor.call.remote("sm", "register_transfer", True, str(tmp_path / "t.txt")),
                          timeout=60)["transfer_id"]
            ray.get(actor.call.remote("sm", "transfer_files", tid), timeout=60)
            client.wait(f"soma/sm/state/transfer/{tid} state=complete", timeout=30)
            snap = {e.key: e for e in client.status("soma/sm/state/transfer/") if isinstance(e, StateChanged)}
            assert (snap[f"transfer/{tid}"].state, snap[f"transfer/{tid}"].native) == (State.COMPLETE, "on both sides")
            with pytest.raises(Exception, match="soma UnknownObjectError: The transfer 999 is not valid"):
                ray.get(actor.call.remote("sm", "transfer_status", 999), timeout=60)
            # a long job is running when the session is removed
            wf2 = ray.get(actor.call.remote("sm", "submit_workflow", {"name": "long", "jobs": [
                {"name": "a", "command": ["sleep", "60"]}]}), timeout=60)
            client.wait(f"soma/sm/state/{wf2}/a state=active", timeout=60)
            probe = ray.get(actor.__ray_call__.remote(_actor_probe), timeout=30)
            assert len(probe["soma_threads"]) == 3 and len(probe["children"]) == 1
            ray.get(actor.remove_session.remote("sm"), timeout=60)
            after = ray.get(actor.__ray_call__.remote(_actor_probe), timeout=30)
            assert after["soma_threads"] == [] and after["children"] == []
            assert after["threads"] <= probe["threads"] - 3
            assert not psutil.pid_exists(probe["children"][0])
            last = {e.key: e for e in client.status("soma/sm/") if isinstance(e, StateChanged)}
            assert last[f"{wf2}/a"].state.final and last[str(wf2)].state.final
        finally:
            if client is not None:
                client.close()
            ray.get(sup.stop.remote(), timeout=90)
            ray.kill(sup)

    @pytest.mark.timeout(300)
    def test_actor_sigkill_next_incarnation_recovers(self, ray_local: str, broker_factory: Any, tmp_path: Path) -> None:
        """SIGKILL of the actor while a job runs: Ray restarts the actor, the new session opens the same
        directory, no copy of the old job is left running, and the workflow is restarted to completion."""
        import signal

        ray = pytest.importorskip("ray")
        from flowbus.actors import ACTOR_PREFIX, Supervisor, actor_pid, wait_started
        from flowbus.bus import Client
        from flowbus.schemas import FlowbusConfig, RayConfig

        flag = tmp_path / "flag"
        broker = broker_factory()
        cfg = FlowbusConfig(ray=RayConfig(namespace="flowbus-test"), sessions=[
            SomaSessionConfig(name="sk", actor="somak", directory=str(tmp_path / "soma"), poll_interval=0.05,
                              engine_refresh=0.05)])
        sup = Supervisor.remote(msgspec.json.encode(cfg), broker.address)
        client: Client | None = None
        try:
            assert ray.get(sup.start.remote(), timeout=120) == {"sk": "somak"}
            client = Client(broker.address)
            actor = ray.get_actor(ACTOR_PREFIX + "somak")
            wf = ray.get(actor.call.remote("sk", "submit_workflow", {"name": "k", "jobs": [
                {"name": "a", "command": _restartable(flag)}, {"name": "b", "command": ["true"], "after": ["a"]}]}),
                timeout=60)
            client.wait(f"soma/sk/state/{wf}/a state=active", timeout=60)
            shells = poll.until(lambda: [p for p in psutil.process_iter(["cmdline"])
                                         if str(flag) in " ".join(p.info["cmdline"] or [])], 10, "the job process")
            kids = poll.until(lambda: [c for p in shells for c in p.children(recursive=True)], 10, "the job's sleep")
            jobs = shells + kids
            assert len(jobs) == 2  # sh and its sleep: Ray only ends a dead worker's direct children
            old_pid = actor_pid(actor)
            with client.expect(f"soma/sk/recovery/{wf} type=recovery.attempted", timeout=150) as w:
                os.kill(old_pid, signal.SIGKILL)
                info = wait_started(actor, timeout=150)
            assert info["pid"] != old_pid
            assert isinstance(w.event, RecoveryAttempted) and w.event.action == "reattach" and w.event.ok
            done = client.wait(f"soma/sk/state/{wf} final=true", timeout=120)
            assert isinstance(done, StateChanged) and done.state is State.COMPLETE, done
            for p in jobs:
                assert not psutil.pid_exists(p.pid) or p.status() == psutil.STATUS_ZOMBIE
        finally:
            if client is not None:
                client.close()
            ray.get(sup.stop.remote(), timeout=90)
            ray.kill(sup)
