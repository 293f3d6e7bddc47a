"""WmsSession against the real lsst.ctrl.bps Parsl plugin (socket-free LocalThreads site, real
bash jobs) and against a ctrl_bps service that moves its jobs on each report() (HTCondor and
PanDA cannot run here). No mocks; every wait is bounded; no thread or process is left behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import psutil
import pytest

pytest.importorskip("lsst.ctrl.bps.parsl")

from flowbus.schemas import (
    BackendRejected,
    BackendUnavailable,
    ConfigError,
    Connected,
    Disconnected,
    ErrorEvent,
    Observed,
    RecoveryAttempted,
    Resynced,
    State,
    StateChanged,
    UnknownOperation,
    WmsSessionConfig,
    parse_config,
)
from flowbus.services import BackendSession
from flowbus.services.wms import WmsSession
from flowbus.services.wms._parsl import PARSL_LOCK
from support import wms as stepping
from support import wms_run as _wr
from support.recorder import Recorder
from support.wms_run import Running

wms = _wr.wms

STEPPING = "support.wms.SteppingService"
OLDER = "support.wms.OlderService"


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _processes_before() -> None:
    """Processes that ran before the test (a session-wide Ray from other test files) are not ours."""
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))


def _new_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if p.pid not in _BEFORE and p.status() != psutil.STATUS_ZOMBIE]

def sh(script: str) -> list[str]:
    return ["bash", "-c", script]


def wf(name: str, *jobs: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "jobs": list(jobs)}


class TestParsl:
    """Real Parsl runs of flowbus descriptions through lsst.ctrl.bps.parsl.ParslService."""

    def test_is_a_backend_session_and_lists_operations(self, wms: Callable[..., Running]) -> None:
        """The session satisfies the BackendSession protocol and publishes Connected and Resynced at start."""
        w = wms()
        assert isinstance(w.session, BackendSession)
        assert {"submit_workflow", "prepare", "submit", "report", "list_submitted_jobs", "cancel", "restart",
                "ping", "run_submission_checks", "status"} <= set(w.session.operations())
        conn = w.rec.of(Connected)
        assert conn and "lsst.ctrl.bps.parsl.ParslService" in conn[0].detail
        assert w.rec.of(Resynced)[0].changed == 0

    def test_chain_runs_in_order_with_env_and_cwd(self, wms: Callable[..., Running], tmp_path: Path) -> None:
        """A chain runs in dependency order; env, cwd and braces reach the job; every state is published."""
        out = tmp_path / "order.txt"
        w = wms()
        r = w.call("submit_workflow", wf(
            "chain",
            {"name": "a", "command": sh(f"echo a >> {out}")},
            {"name": "b", "command": sh(f'echo "b $FOO {{x}} $(pwd)" >> {out}'), "after": ["a"],
             "env": {"FOO": "bar"}, "cwd": str(tmp_path)},
            {"name": "c", "command": ["/bin/sh", "-c", f"echo c >> {out}"], "after": ["b"]}))
        wid = r["wms_id"]
        assert r["name"] == "chain" and os.path.isdir(wid) and wid.startswith(str(tmp_path))
        done = w.final(wid)
        assert done.native == "SUCCEEDED" and done.state is State.COMPLETE and done.observed is Observed.POLL
        assert out.read_text().splitlines() == ["a", f"b bar {{x}} {tmp_path}", "c"]
        for job in "abc":
            natives = w.natives(f"{wid}/{job}")
            assert natives[0] == "UNREADY" and natives[-1] == "SUCCEEDED", natives
            ev = w.rec.states(f"{wid}/{job}")[-1]
            assert ev.attrs == {"kind": "job", "wms_id": wid, "name": job}
        # the workflow's final state comes after every job's final state
        last_job = max(w.rec.index(w.rec.states(f"{wid}/{j}")[-1]) for j in "abc")
        assert w.rec.index(done) > last_job
        assert w.call("status", wid)["jobs"] == {"a": "SUCCEEDED", "b": "SUCCEEDED", "c": "SUCCEEDED"}
        assert [v["wms_id"] for v in w.call("status")] == [wid]

    def test_failure_prunes_dependents_and_restart_reruns_only_those(self, wms: Callable[..., Running],
                                                                    tmp_path: Path) -> None:
        """A failing job is FAILED and its dependents PRUNED; restart re-runs only those."""
        ran, flag = tmp_path / "ran.txt", tmp_path / "fail-b"
        flag.touch()
        w = wms()
        wid = w.call("submit_workflow", wf(
            "fails",
            {"name": "a", "command": sh(f"echo a >> {ran}")},
            {"name": "b", "command": sh(f"echo b >> {ran}; test ! -e {flag}"), "after": ["a"]},
            {"name": "c", "command": sh(f"echo c >> {ran}"), "after": ["b"]},
            {"name": "d", "command": sh(f"echo d >> {ran}"), "after": ["a"]}))["wms_id"]
        done = w.final(wid)
        assert done.native == "FAILED" and done.state is State.ABORTED and "b" in done.detail
        view = w.call("status", wid)["jobs"]
        assert view == {"a": "SUCCEEDED", "b": "FAILED", "c": "PRUNED", "d": "SUCCEEDED"}
        assert "exit code 1" in w.rec.states(f"{wid}/b")[-1].detail
        assert w.rec.states(f"{wid}/c")[-1].state is State.CANCELLED
        assert sorted(ran.read_text().split()) == ["a", "b", "d"]  # retries = 0: b ran once

        flag.unlink()
        mark = len(w.rec.events)
        assert w.call("restart", wid) == {"wms_id": wid, "name": "fails", "message": ""}
        again = w.final(wid, after=mark)
        assert again.native == "SUCCEEDED"
        assert sorted(ran.read_text().split()) == ["a", "b", "b", "c", "d"]
        assert w.natives(f"{wid}/a", mark) == [] and w.natives(f"{wid}/d", mark) == []
        assert w.natives(f"{wid}/b", mark)[-1] == "SUCCEEDED" and w.natives(f"{wid}/c", mark)[-1] == "SUCCEEDED"

        # a second failure and a second restart still skip everything that succeeded
        mark = len(w.rec.events)
        assert w.call("restart", wid)["wms_id"] == wid
        assert w.final(wid, after=mark).native == "SUCCEEDED"
        assert sorted(ran.read_text().split()) == ["a", "b", "b", "c", "d"]

    def test_cancel_kills_running_and_skips_pending(self, wms: Callable[..., Running], tmp_path: Path) -> None:
        """cancel ends a running job and its dependents never run; the workflow is DELETED."""
        started, ran, quick = tmp_path / "started", tmp_path / "ran-after", tmp_path / "quick"
        w = wms()
        wid = w.call("submit_workflow", wf(
            "slow",
            {"name": "sleeper", "command": sh(f"test -e {quick} && exit 0; touch {started}; sleep 60")},
            {"name": "after", "command": sh(f"touch {ran}"), "after": ["sleeper"]}))["wms_id"]
        w.rec.wait_for(lambda ev: started.exists(), 60, "the sleeper to start")
        t0 = time.monotonic()
        assert w.call("cancel", wid)["ok"] is True
        done = w.final(wid, timeout=30)
        assert time.monotonic() - t0 < 30
        assert done.native == "DELETED" and done.state is State.CANCELLED
        assert w.call("status", wid)["jobs"] == {"sleeper": "DELETED", "after": "PRUNED"}
        assert not ran.exists()
        assert w.call("cancel", wid)["ok"] is False  # no longer running
        # cancel then restart (a policy's kill-retry): the cancelled jobs run again
        quick.touch()
        mark = len(w.rec.events)
        assert w.call("restart", wid)["wms_id"] == wid
        assert w.final(wid, after=mark).native == "SUCCEEDED"
        assert ran.exists()

    def test_job_end_is_pushed_from_its_future(self, wms: Callable[..., Running]) -> None:
        """A job seen running is published final from Parsl's completion callback (observed=push)."""
        w = wms()
        wid = w.call("submit_workflow", wf("push", {"name": "s", "command": ["sleep", "1"]}))["wms_id"]
        w.rec.wait_for(lambda ev: "RUNNING" in w.natives(f"{wid}/s"), 60, "the job to run")
        assert w.final(f"{wid}/s").observed is Observed.PUSH
        assert w.final(wid).native == "SUCCEEDED"

    def test_kill_ends_jobs_without_waiting(self, tmp_path: Path) -> None:
        """kill() returns at once, never raises, and the running job's processes end."""
        started = tmp_path / "started"
        session = WmsSession(WmsSessionConfig(name="wk", submit_dir=str(tmp_path / "s")))
        session.start(Recorder(), {})
        wid = session.call("submit_workflow", wf("k", {"name": "s", "command": sh(f"touch {started}; sleep 60")}))["wms_id"]
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            session.poll()
            time.sleep(0.05)
        assert started.exists()
        t0 = time.monotonic()
        session.kill()
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 30
        while PARSL_LOCK.locked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not PARSL_LOCK.locked(), f"the runner of {wid} did not end"
        assert not _new_processes()

    def test_two_sessions_share_one_parsl(self, wms: Callable[..., Running], tmp_path: Path) -> None:
        """Workflows of two sessions in one process queue for Parsl (PENDING) and both complete."""
        gate = tmp_path / "gate"
        w1, w2 = wms("w1"), wms("w2")
        id1 = w1.call("submit_workflow", wf("first", {"name": "wait", "command": sh(
            f"for i in $(seq 600); do test -e {gate} && exit 0; sleep 0.1; done; exit 1")}))["wms_id"]
        w1.rec.wait_for(lambda ev: "RUNNING" in w1.natives(id1), 60, "the first workflow to run")
        id2 = w2.call("submit_workflow", wf("second", {"name": "x", "command": ["true"]}))["wms_id"]
        queued = w2.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, StateChanged) and e.key == id2
                                                 and e.native == "PENDING"), None), 30, "the second to queue")
        assert "one workflow at a time" in queued.detail
        assert "RUNNING" not in w2.natives(id2)
        gate.touch()
        assert w1.final(id1).native == "SUCCEEDED"
        assert w2.final(id2).native == "SUCCEEDED"
        natives = w2.natives(id2)  # RUNNING may fall between two polls: the job is quick
        assert natives[:2] == ["READY", "PENDING"] and natives[-1] == "SUCCEEDED", natives

    def test_cancel_a_queued_workflow(self, wms: Callable[..., Running], tmp_path: Path) -> None:
        """A workflow waiting for Parsl is cancelled before it starts: its jobs never run."""
        gate, marker = tmp_path / "gate", tmp_path / "ran"
        w1, w2 = wms("w1"), wms("w2")
        id1 = w1.call("submit_workflow", wf("first", {"name": "wait", "command": sh(
            f"for i in $(seq 600); do test -e {gate} && exit 0; sleep 0.1; done; exit 1")}))["wms_id"]
        w1.rec.wait_for(lambda ev: "RUNNING" in w1.natives(id1), 60, "the first workflow to run")
        id2 = w2.call("submit_workflow", wf("second", {"name": "x", "command": sh(f"touch {marker}")}))["wms_id"]
        w2.rec.wait_for(lambda ev: "PENDING" in w2.natives(id2), 30, "the second to queue")
        assert w2.call("cancel", id2)["ok"] is True
        assert w2.final(id2, timeout=30).native == "DELETED"
        assert w2.call("status", id2)["jobs"] == {"x": "DELETED"}
        gate.touch()
        assert w1.final(id1).native == "SUCCEEDED"
        assert not marker.exists()

    def test_failed_prepare_and_failed_submit_leave_parsl_usable(self, wms: Callable[..., Running],
                                                                 tmp_path: Path) -> None:
        """A prepare that raises and a submit that fails inside parsl.load are reported; the next one works."""
        w = wms()
        good = wf("good", {"name": "ok", "command": ["true"]})
        with pytest.raises(BackendRejected, match=r"cannot import 'no_such_module'|no_such_module") as err:
            w.call("submit_workflow", good, bps_config={"site": {"local": {"class": "no_such_module.Site"}}})
        assert "prepare" in str(err.value)
        broken = w.call("submit_workflow", good, bps_config={"site": {"local": {"class": "support.wms.BrokenSite"}}})
        bad = w.final(broken["wms_id"])
        assert bad.native == "FAILED" and "executor refuses to start" in bad.detail
        assert not PARSL_LOCK.locked()
        ok = w.call("submit_workflow", good)["wms_id"]
        assert w.final(ok).native == "SUCCEEDED"

    def test_resync_marks_lost_runs_unknown(self, wms: Callable[..., Running]) -> None:
        """A Parsl run that was running in a previous incarnation goes UNKNOWN with observed=resync."""
        wid = "/nowhere/wf-1"
        known = {wid: StateChanged(source="w1", backend="wms", key=wid, state=State.ACTIVE, native="RUNNING",
                                   attrs={"kind": "workflow", "wms_id": wid, "name": "wf"}),
                 f"{wid}/a": StateChanged(source="w1", backend="wms", key=f"{wid}/a", state=State.COMPLETE,
                                          native="SUCCEEDED", attrs={"kind": "job", "wms_id": wid, "name": "a"}),
                 f"{wid}/b": StateChanged(source="w1", backend="wms", key=f"{wid}/b", state=State.ACTIVE,
                                          native="RUNNING", attrs={"kind": "job", "wms_id": wid, "name": "b"})}
        w = wms(known=known)
        got = {e.key: e for e in w.rec.of(StateChanged)}
        assert set(got) == {wid, f"{wid}/b"}
        assert all(e.observed is Observed.RESYNC and e.native == "UNKNOWN" for e in got.values())
        assert got[wid].native_previous == "RUNNING" and "restart" in got[wid].detail
        assert w.rec.of(Resynced)[0].changed == 2

    def test_release_stops_observing_and_the_run_ends_here(self, wms: Callable[..., Running], tmp_path: Path) -> None:
        """release() of a Parsl session publishes nothing and cancels nothing: the run cannot move,
        it goes on in this process, unobserved, and its job finishes."""
        gate, done = tmp_path / "gate", tmp_path / "done"
        w = wms()
        wid = w.call("submit_workflow", wf("rel", {"name": "wait", "command": sh(
            f"for i in $(seq 600); do test -e {gate} && touch {done} && exit 0; sleep 0.1; done; exit 1")}))["wms_id"]
        w.rec.wait_for(lambda ev: "RUNNING" in w.natives(f"{wid}/wait"), 60, "the job to run")
        run = w.session._runs[wid]
        w.halt()  # the host stops polling a fenced session before it releases it
        mark = len(w.rec.events)
        w.session.release()
        w.session.release()
        assert run.phase == "running", "release ended the run"
        gate.touch()
        assert run.join(60), "the run did not end"
        assert done.exists(), "the job did not finish"
        assert w.session.poll() > 0
        w.session.stop()
        assert len(w.rec.events) == mark, w.rec.events[mark:]
        with pytest.raises(BackendUnavailable, match="session 'w1' is closed"):
            w.call("status", wid)

    def test_stop_cancels_running_workflow_and_leaves_nothing(self, tmp_path: Path) -> None:
        """stop() during a run publishes DELETED and Disconnected and leaves no thread or process."""
        before = set(threading.enumerate())
        started = tmp_path / "started"
        session = WmsSession(WmsSessionConfig(name="w9", submit_dir=str(tmp_path / "s")))
        rec = Recorder()
        session.start(rec, {})
        wid = session.call("submit_workflow", wf("long", {"name": "s", "command": sh(f"touch {started}; sleep 60")}))["wms_id"]
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            session.poll()
            time.sleep(0.05)
        assert started.exists()
        session.stop()
        assert [e.native for e in rec.states(wid)][-1] == "DELETED"
        assert isinstance(rec.events[-1], Disconnected) and rec.events[-1].will_retry is False
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert not left, left
        assert not _new_processes()
        session.stop()  # idempotent


class TestReportPolling:
    """The generic path: a service implementing report(), polled and diffed."""

    def test_states_move_on_each_report(self, wms: Callable[..., Running]) -> None:
        """Each report moves the jobs; the session publishes every step, FAILED and PRUNED included."""
        stepping.reset()
        w = wms(service_class=STEPPING, report_interval=0.05)
        r = w.call("submit_workflow", wf(
            "steps", {"name": "a", "command": ["true"]},
            {"name": "fail1", "command": ["true"], "after": ["a"]},
            {"name": "c", "command": ["true"], "after": ["fail1"]},
            {"name": "d", "command": ["true"], "after": ["a"]}))
        wid = r["wms_id"]
        assert wid.startswith("step-") and os.path.isfile(os.path.join(r["submit_path"], "stepping.txt"))
        done = w.final(wid, timeout=30)
        assert done.native == "FAILED"
        assert w.natives(f"{wid}/a") == ["UNREADY", "PENDING", "RUNNING", "SUCCEEDED"]
        assert w.natives(f"{wid}/fail1")[-3:] == ["PENDING", "RUNNING", "FAILED"]
        assert w.natives(f"{wid}/c")[-1] == "PRUNED" and w.natives(f"{wid}/d")[-1] == "SUCCEEDED"
        assert all(e.observed is Observed.POLL for e in w.rec.of(StateChanged))
        reports = stepping._RUNS[wid].reports
        time.sleep(0.3)  # a final run is no longer reported (the interval is 0.05 s)
        assert stepping._RUNS[wid].reports == reports

        mark = len(w.rec.events)
        again = w.call("restart", wid)
        assert again["wms_id"] != wid and again["name"] == "steps"
        assert w.final(again["wms_id"], after=mark).native == "SUCCEEDED"
        assert w.natives(f"{again['wms_id']}/fail1")[-1] == "SUCCEEDED"

    def test_raw_operations_give_plain_data(self, wms: Callable[..., Running]) -> None:
        """report, list_submitted_jobs, cancel, ping, prepare+submit work raw; results are msgpack-able."""
        stepping.reset()
        w = wms(service_class=STEPPING, report_interval=60)
        prep = w.call("prepare", wf("raw", {"name": "a", "command": ["true"]}, {"name": "b", "command": ["true"], "after": ["a"]}))
        sub = w.call("submit", prep["wms_id"])
        wid = sub["wms_id"]
        rep = w.call("report", wid)
        run = rep["runs"][0]
        assert run["wms_id"] == wid and run["state"] in ("PENDING", "RUNNING") and run["total_number_jobs"] == 2
        assert {j["name"] for j in run["jobs"]} == {"a", "b"} and isinstance(run["job_state_counts"], dict)
        assert "SUCCEEDED" in run["job_state_counts"]
        assert [r["wms_id"] for r in w.call("report")["runs"]] == [wid]
        assert w.call("list_submitted_jobs") == [wid]
        assert w.call("ping") == {"status": 0, "message": ""}
        assert w.call("cancel", wid) == {"ok": True, "message": ""}
        assert w.call("status", wid)["state"] == "DELETED"
        assert w.call("cancel", "step-999")["ok"] is False

    def test_unsupported_operations_are_named(self, wms: Callable[..., Running]) -> None:
        """An operation the service does not implement names itself and the class; the session keeps going."""
        stepping.reset()
        w = wms(service_class=STEPPING)
        with pytest.raises(UnknownOperation, match=r"get_status is not supported by support.wms.SteppingService"):
            w.call("get_status", "step-1")
        p = wms("w2")
        assert p.call("run_submission_checks")["checked"] is False  # none in the plugin: BPS skips them
        for op, args in [("report", ()), ("ping", ()), ("list_submitted_jobs", ()), ("get_status", ("x",)),
                         ("watch", ("x",))]:
            with pytest.raises(UnknownOperation, match=r"not supported by lsst.ctrl.bps.parsl.ParslService"):
                p.call(op, *args)
        assert w.call("ping")["status"] == 0

    def test_resync_reports_known_runs(self, wms: Callable[..., Running]) -> None:
        """A new session reports the runs the journal knows and publishes the differences as resync."""
        stepping.reset()
        first = wms("w1", service_class=STEPPING, report_interval=60)
        wid = first.call("submit_workflow", wf("r", {"name": "a", "command": ["true"]}))["wms_id"]
        known = {e.key: e for e in first.rec.of(StateChanged)}
        assert known[wid].native == "PENDING"
        second = wms("w1", known=known, service_class=STEPPING, report_interval=0.05)
        resync = [e for e in second.rec.of(StateChanged) if e.observed is Observed.RESYNC]
        assert resync and {e.key for e in resync} <= {wid, f"{wid}/a"}
        assert second.final(wid, timeout=30).native == "SUCCEEDED"
        assert all(e.native_previous for e in resync)

    def test_release_leaves_the_run_to_the_next_session(self, wms: Callable[..., Running]) -> None:
        """After release() the first session publishes nothing more; the run goes on in the WMS
        and a new session that knows it follows it to the end."""
        stepping.reset()
        first = wms("w1", service_class=STEPPING, report_interval=0.05)
        wid = first.call("submit_workflow", wf("r", {"name": "a", "command": ["true"]},
                                               {"name": "b", "command": ["true"], "after": ["a"]}))["wms_id"]
        first.rec.wait_for(lambda ev: "RUNNING" in first.natives(wid), 30, "the run to move")
        first.halt()
        mark = len(first.rec.events)
        first.session.release()
        first.session.poll()
        first.session.stop()
        assert len(first.rec.events) == mark, first.rec.events[mark:]
        known = {e.key: e for e in first.rec.of(StateChanged)}
        assert known[wid].native == "RUNNING"
        second = wms("w1", known=known, service_class=STEPPING, report_interval=0.05)
        assert second.final(wid, timeout=30).native == "SUCCEEDED"
        assert second.final(f"{wid}/b", timeout=30).native == "SUCCEEDED"
        assert len(first.rec.events) == mark

    def test_watch_a_run_submitted_elsewhere(self, wms: Callable[..., Running]) -> None:
        """watch follows a run this session did not submit."""
        stepping.reset()
        other = wms("other", service_class=STEPPING, report_interval=60)
        wid = other.call("submit_workflow", wf("x", {"name": "a", "command": ["true"]}))["wms_id"]
        w = wms("watcher", service_class=STEPPING, report_interval=0.05)
        assert w.call("watch", wid)["wms_id"] == wid
        assert w.final(wid, timeout=30).native == "SUCCEEDED"


class TestReachingTheWms:
    """A WMS that is down (its ping fails, its report cannot connect): the session opens or goes
    DOWN, refuses calls naming itself, and reconnects with a resync once the WMS is back."""

    @pytest.fixture(autouse=True)
    def _wms_up_again(self) -> Iterator[None]:
        stepping.reset()
        yield
        stepping.OUTAGE.clear()

    def test_down_at_start_opens_disconnected_then_connects(self, wms: Callable[..., Running]) -> None:
        """start() against a WMS that is down returns with the session DOWN (Disconnected, will
        retry), retries with backoff, and connects once the WMS answers."""
        stepping.OUTAGE.set()
        t0 = time.monotonic()
        w = wms("w1", service_class=STEPPING, report_interval=0.05)
        assert time.monotonic() - t0 < 5
        down = w.rec.of(Disconnected)
        assert len(down) == 1 and down[0].will_retry and "stepping WMS is down" in down[0].reason, w.rec.events
        assert not w.rec.of(Connected)
        with pytest.raises(BackendUnavailable, match="submit_workflow: session 'w1' is disconnected"):
            w.call("submit_workflow", wf("x", {"name": "a", "command": ["true"]}))
        # the start's ping, then two reconnects, each after a longer backoff (0.05 s, then 0.1 s)
        pinged = [stepping.DOWN_PINGS.get(timeout=10) for _ in range(3)]
        assert pinged[1] - pinged[0] >= 0.045 and pinged[2] - pinged[1] >= 0.095, pinged
        assert not w.rec.of(Connected)
        mark = len(w.rec.events)
        stepping.OUTAGE.clear()
        w.rec.wait_for(lambda ev: [e for e in ev[mark:] if isinstance(e, Resynced)], 10, "Resynced")
        after = [type(e) for e in w.rec.events[mark:]]
        assert after[after.index(Connected) - 1] is RecoveryAttempted and after[-1] is Resynced, after
        assert w.rec.of(RecoveryAttempted)[-1].attempt >= 2
        assert w.session.phase == "up"
        wid = w.call("submit_workflow", wf("x", {"name": "a", "command": ["true"]}))["wms_id"]
        assert w.final(wid, timeout=30).native == "SUCCEEDED"

    def test_lost_wms_disconnects_and_resyncs_on_return(self, wms: Callable[..., Running]) -> None:
        """The WMS goes down under a run: Disconnected within report-interval (+ one ping),
        calls refused; back up: RecoveryAttempted, Connected, the run's changes as resync,
        Resynced, and the run is followed to its end."""
        w = wms("w1", service_class=STEPPING, report_interval=0.1)
        chain = [{"name": "j0", "command": ["true"]}] + [
            {"name": f"j{i}", "command": ["true"], "after": [f"j{i - 1}"]} for i in range(1, 6)]
        wid = w.call("submit_workflow", wf("chain", *chain))["wms_id"]
        w.rec.wait_for(lambda ev: "RUNNING" in w.natives(wid), 30, "the run to move")
        t0 = time.monotonic()
        stepping.OUTAGE.set()
        lost = w.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, Disconnected)), None), 10,
                              "Disconnected")
        assert time.monotonic() - t0 < 2.0
        assert lost.will_retry and "stepping WMS is down" in lost.reason
        with pytest.raises(BackendUnavailable, match="status: session 'w1' is disconnected"):
            w.call("status", wid)
        assert stepping._RUNS[wid].states["j5"].name == "UNREADY"  # the WMS kept the run
        mark = len(w.rec.events)
        stepping.OUTAGE.clear()
        resynced = w.rec.wait_for(lambda ev: next((e for e in ev[mark:] if isinstance(e, Resynced)), None), 10,
                                  "Resynced")
        after = w.rec.events[mark:]
        kinds = [type(e) for e in after]
        at = kinds.index(Connected)
        assert kinds[at - 1] is RecoveryAttempted, kinds
        diff = after[at + 1:after.index(resynced)]
        assert diff and all(isinstance(e, StateChanged) and e.observed is Observed.RESYNC for e in diff), diff
        assert resynced.changed == len(diff)
        assert w.final(wid, timeout=30).native == "SUCCEEDED"
        assert w.call("status", wid)["jobs"]["j5"] == "SUCCEEDED"

    def test_failing_report_is_an_error_then_a_loss_then_recovers(self, wms: Callable[..., Running]) -> None:
        """report() raising (the WMS answers pings): one ErrorEvent naming report and the run, then,
        after three failures in a row, Disconnected (will retry); reconnects fail while report()
        does (RecoveryAttempted ok=False); once it answers, Connected and Resynced, and the run is
        followed to its end."""
        w = wms("w1", service_class=STEPPING, report_interval=0.05)
        wid = w.call("submit_workflow", wf("x", {"name": "a", "command": ["true"]}, {"name": "b", "command": ["true"],
                                                                                      "after": ["a"]}))["wms_id"]
        w.rec.wait_for(lambda ev: "PENDING" in w.natives(wid) or "RUNNING" in w.natives(wid) or None, 30,
                       "the run to move")
        mark = len(w.rec.events)
        stepping.REPORT_BROKEN.set()
        lost = w.rec.wait_for(lambda ev: next((e for e in ev[mark:] if isinstance(e, Disconnected)), None), 10,
                              "Disconnected")
        assert lost.will_retry and "report() failed 3 times in a row" in lost.reason, lost
        errors = [e for e in w.rec.events[mark:] if isinstance(e, ErrorEvent)]
        assert len(errors) == 1 and errors[0].operation == "report" and errors[0].key == wid, errors
        assert "stepping WMS report broke" in errors[0].message
        w.rec.wait_for(lambda ev: next((e for e in ev[mark:] if isinstance(e, RecoveryAttempted) and not e.ok), None),
                       10, "a failed reconnect")
        back = len(w.rec.events)
        stepping.REPORT_BROKEN.clear()
        w.rec.wait_for(lambda ev: next((e for e in ev[back:] if isinstance(e, Resynced)), None), 10, "Resynced")
        assert w.final(wid, timeout=30).native == "SUCCEEDED"

    def test_submission_checks_as_bps_runs_them(self, wms: Callable[..., Running]) -> None:
        """run_submission_checks: a failing check is BackendRejected naming why, and halts a
        submission before anything is prepared; runWmsSubmissionChecks = false skips them; a
        plugin without checks passes (as BPS skips them)."""
        w = wms("w1", service_class=STEPPING, report_interval=0.05)
        assert w.call("run_submission_checks") == {"ok": True, "checked": True, "detail": ""}
        stepping.CHECKS_FAIL.set()
        with pytest.raises(BackendRejected, match=r"run_submission_checks: the submission checks of "
                                                  r"support.wms.SteppingService failed: .*no proxy certificate"):
            w.call("run_submission_checks")
        before = len(stepping._RUNS)
        with pytest.raises(BackendRejected, match=r"prepare: the submission checks .* no proxy certificate"):
            w.call("submit_workflow", wf("x", {"name": "a", "command": ["true"]}))
        assert len(stepping._RUNS) == before
        ran = len(stepping.CHECKS_RUN)
        wid = w.call("submit_workflow", wf("x", {"name": "a", "command": ["true"]}),
                     bps_config={"runWmsSubmissionChecks": False})["wms_id"]
        assert len(stepping.CHECKS_RUN) == ran
        assert w.final(wid, timeout=30).native == "SUCCEEDED"
        older = wms("w2", service_class=OLDER, report_interval=0.05)
        assert older.call("run_submission_checks")["checked"] is False
        assert older.final(older.call("submit_workflow", wf("y", {"name": "a", "command": ["true"]}))["wms_id"],
                           timeout=30).native == "SUCCEEDED"

    def test_arguments_follow_the_plugins_signature(self, wms: Callable[..., Running]) -> None:
        """A plugin whose report() lacks is_global/return_exit_codes still reports (they are left
        out at their documented defaults); setting one it does not take is refused, naming it."""
        w = wms("w1", service_class=OLDER, report_interval=0.05)
        wid = w.call("submit_workflow", wf("x", {"name": "a", "command": ["true"]}))["wms_id"]
        assert w.call("report", wid)["runs"][0]["wms_id"] == wid
        with pytest.raises(BackendRejected, match=r"report: support.wms.OlderService.report\(\) does not take "
                                                  r"'is_global'"):
            w.call("report", wid, is_global=True)
        assert w.final(wid, timeout=30).native == "SUCCEEDED"

    def test_bps_config_cannot_change_what_the_session_observes(self, wms: Callable[..., Running],
                                                                 tmp_path: Path) -> None:
        """A bps_config naming another service class or a submit path is refused, per workflow
        (the session goes on) and in the session's config (start fails)."""
        w = wms()
        job = wf("x", {"name": "a", "command": ["true"]})
        with pytest.raises(BackendRejected, match="bps_config key 'submitPath' is refused on session 'w1'"):
            w.call("submit_workflow", job, bps_config={"submitPath": str(tmp_path / "elsewhere")})
        with pytest.raises(BackendRejected, match=r"'wmsServiceClass' is refused .*lsst\.ctrl\.bps\.parsl\.ParslService"):
            w.call("prepare", job, {"wmsServiceClass": STEPPING})
        assert w.final(w.call("submit_workflow", job)["wms_id"]).native == "SUCCEEDED"
        session = WmsSession(WmsSessionConfig(name="bad", submit_dir=str(tmp_path / "s"),
                                              bps_config={"wmsServiceClass": STEPPING}))
        with pytest.raises(BackendRejected, match="bps-config: bps_config key 'wmsServiceClass' is refused"):
            session.start(Recorder(), {})


class TestBadInput:
    """Bad input gets a clear error naming what was wrong; the session keeps running."""

    @pytest.mark.parametrize(("description", "needle"), [
        ({"name": "x", "jobs": []}, "has no jobs"),
        ({"name": "x", "jobs": [{"name": "a", "command": []}]}, "empty command"),
        ({"name": "x", "jobs": [{"name": "a", "command": ["true"], "after": ["nope"]}]}, "unknown job 'nope'"),
        ({"name": "x", "jobs": [{"name": "a", "command": ["true"], "after": ["b"]},
                                {"name": "b", "command": ["true"], "after": ["a"]}]}, "cycle"),
        ({"name": "x", "jobs": [{"name": "a", "command": ["true"], "bogus": 1}]}, "bogus"),
        ({"name": "x", "jobs": [{"name": "a", "command": ["true"], "env": {"1X": "v"}}]}, "'1X' is not a variable"),
        ("not json", "invalid description"),
    ])
    def test_bad_descriptions(self, wms: Callable[..., Running], description: Any, needle: str) -> None:
        """Every malformed description is rejected before anything runs, naming the problem."""
        w = wms()
        with pytest.raises(BackendRejected, match=needle):
            w.call("submit_workflow", description)

    def test_unknown_ids_operations_and_arguments(self, wms: Callable[..., Running]) -> None:
        """Unknown ids, operations and arguments are rejected; a good workflow still runs after."""
        w = wms()
        for op, args in [("submit", ("/no/such",)), ("restart", ("/no/such",)), ("status", ("/no/such",)),
                         ("cancel", ("/no/such",))]:
            with pytest.raises(BackendRejected, match=r"no such|unknown|not a Parsl|no prepared"):
                w.call(op, *args)
        with pytest.raises(UnknownOperation, match="unknown operation 'frobnicate'"):
            w.call("frobnicate")
        with pytest.raises(BackendRejected, match="unexpected keyword"):
            w.call("submit_workflow", wf("x", {"name": "a", "command": ["true"]}), colour="red")
        with pytest.raises(BackendRejected, match="bps_config must be a table"):
            w.call("prepare", wf("x", {"name": "a", "command": ["true"]}), "nope")
        wid = w.call("submit_workflow", wf("after", {"name": "a", "command": ["true"]}))["wms_id"]
        assert w.final(wid).native == "SUCCEEDED"

    @pytest.mark.parametrize(("path", "needle"), [
        ("no_such_pkg.Service", "cannot import 'no_such_pkg': ModuleNotFoundError"),
        ("support.wms.Missing", "has no attribute 'Missing'"),
        ("support.wms.NotAService", "not a subclass of lsst.ctrl.bps.BaseWmsService"),
    ])
    def test_bad_service_class_at_start(self, path: str, needle: str, tmp_path: Path) -> None:
        """A service class that cannot be used fails start() naming the session, the class path
        and why (a config no retry can fix); the session is closed."""
        session = WmsSession(WmsSessionConfig(name="bad", service_class=path, submit_dir=str(tmp_path)))
        rec = Recorder()
        with pytest.raises(BackendRejected, match=needle) as err:
            session.start(rec, {})
        assert path in str(err.value) and "session 'bad'" in str(err.value)
        assert rec.events == []
        with pytest.raises(BackendUnavailable, match="status: session 'bad' is closed"):
            session.call("status")
        session.stop()

    def test_unusable_submit_dir(self, tmp_path: Path) -> None:
        """A submit-dir that cannot be created fails start() naming it."""
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        session = WmsSession(WmsSessionConfig(name="bad", submit_dir=str(blocker / "sub")))
        with pytest.raises(BackendRejected, match=r"submit-dir .*file/sub"):
            session.start(Recorder(), {})

    def test_bad_config_values(self) -> None:
        """Config loading rejects a malformed class path and bad intervals, naming the key."""
        with pytest.raises(ConfigError, match=r"sessions\[0\]\.service-class: 'nodots'"):
            parse_config({"sessions": [{"backend": "wms", "name": "w", "service-class": "nodots"}]})
        with pytest.raises(ConfigError, match="poll-interval"):
            parse_config({"sessions": [{"backend": "wms", "name": "w", "poll-interval": 0}]})
        with pytest.raises(ConfigError, match=r"unknown key 'sessions\[0\].colour'"):
            parse_config({"sessions": [{"backend": "wms", "name": "w", "colour": 1}]})
        cfg = parse_config({"sessions": [{"backend": "wms", "name": "w", "bps-config": {"site": {"local": {"cores": 3}}}}]})
        assert cast(WmsSessionConfig, cfg.sessions[0]).bps_config == {"site": {"local": {"cores": 3}}}


@pytest.mark.ray
class TestWmsInActor:
    """A WMS session hosted by a real BackendActor on Ray, observed through the broker."""

    @pytest.mark.timeout(300)
    def test_submit_fail_restart_through_the_bus(self, ray_local: str, broker_factory: Any, tmp_path: Path) -> None:
        """Through the actor: a workflow fails on the bus, restart completes it, unsupported ops are named."""
        ray = pytest.importorskip("ray")
        from flowbus.actors import ACTOR_PREFIX, Supervisor
        from flowbus.bus import Client
        from flowbus.schemas import FlowbusConfig, RayConfig
        from support.netcheck import off_loopback_listeners

        broker = broker_factory()
        flag, ran = tmp_path / "fail", tmp_path / "ran.txt"
        flag.touch()
        cfg = FlowbusConfig(ray=RayConfig(namespace="flowbus-test"), sessions=[
            WmsSessionConfig(name="w1", submit_dir=str(tmp_path / "submit"), actor="wmsactor")])
        sup = Supervisor.remote(msgspec.json.encode(cfg), broker.address)
        client: Client | None = None
        try:
            assert ray.get(sup.start.remote(), timeout=180) == {"w1": "wmsactor"}
            client = Client(broker.address)
            actor = ray.get_actor(ACTOR_PREFIX + "wmsactor")
            desc = wf("bus", {"name": "a", "command": sh(f"echo a >> {ran}")},
                      {"name": "b", "command": sh(f"echo b >> {ran}; test ! -e {flag}"), "after": ["a"]})
            r = ray.get(actor.call.remote("w1", "submit_workflow", desc), timeout=120)
            wid = r["wms_id"]
            failed = client.wait(f"wms/w1/state/{wid} state=aborted", timeout=120)
            assert isinstance(failed, StateChanged) and failed.native == "FAILED"
            assert cast(StateChanged, client.wait(f"wms/w1/state/{wid}/b state=aborted", timeout=10)).native == "FAILED"
            assert off_loopback_listeners() == []
            flag.unlink()
            with client.expect(f"wms/w1/state/{wid} state=complete", timeout=120) as w:
                assert ray.get(actor.call.remote("w1", "restart", wid), timeout=60)["wms_id"] == wid
            assert isinstance(w.event, StateChanged) and w.event.native == "SUCCEEDED"
            assert sorted(ran.read_text().split()) == ["a", "b", "b"]
            latest = {e.key: e for e in client.status("wms/w1/") if isinstance(e, StateChanged)}
            assert latest[f"{wid}/b"].native == "SUCCEEDED" and latest[wid].attrs["kind"] == "workflow"
            with pytest.raises(Exception, match=r"report is not supported by lsst.ctrl.bps.parsl.ParslService"):
                ray.get(actor.call.remote("w1", "report", wid), timeout=60)
            assert ray.get(actor.call.remote("w1", "status", wid), timeout=60)["state"] == "SUCCEEDED"
        finally:
            if client is not None:
                client.close()
            ray.get(sup.stop.remote(), timeout=90)
            ray.kill(sup)
