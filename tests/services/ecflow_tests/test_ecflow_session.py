"""EcflowSession against real ecflow_server processes (no Ray, no bus).

Servers listen on loopback only (LD_PRELOAD bind shim), run real jobs, and are stopped at
teardown, which proves that no server or job process is left behind. Every test is bounded.
"""

from __future__ import annotations

import itertools
import pickle
import re
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec
import pytest

from flowbus.schemas import (
    AttributeChanged,
    BackendRejected,
    BackendUnavailable,
    Connected,
    Disconnected,
    EcflowSessionConfig,
    Observed,
    RecoveryAttempted,
    RecoveryGaveUp,
    Resynced,
    State,
    StateChanged,
    UnknownOperation,
)
from flowbus.services import BackendSession
from flowbus.services.ecflow import EcflowSession
from support import ecflow as _fx
from support.ecflow import (
    EcfServer,
    Running,
    latest_states,
    missing_finals,
    reached,
    server_states,
    write_suite,
)
from support.recorder import show

# the fixtures, by name
ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session

Server = Callable[..., EcfServer]
Session = Callable[..., Running]

CHAIN = """\
task t1
  event ev1
  meter progress 0 3 3
  label info ""
task t2
  trigger t1 == complete
task t3
  trigger t2 == complete
"""
CHAIN_SCRIPTS = {
    "t1": """\
    ecflow_client --label=info starting
    for i in 1 2 3; do ecflow_client --meter=progress $i; sleep 0.2; done
    ecflow_client --event=ev1
    ecflow_client --label=info done
    """,
    "t2": "sleep 0.3\n",
    "t3": "true\n",
}


class TestObservation:
    """Node states, events, meters and labels of a running suite reach emit as typed events."""

    @pytest.mark.timeout(60)
    def test_trigger_chain_completes_in_order(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A three-task trigger chain is seen submitted/active/complete task after task, with t1's attributes."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "chain", CHAIN, CHAIN_SCRIPTS))
        run.call("begin_suite", "chain")
        run.rec.wait_for(reached("/chain/t3", State.COMPLETE), 30, "t3 complete")
        run.rec.wait_for(reached("/chain", State.COMPLETE), 10, "suite complete")
        ev = run.rec.events
        idx = {k: ev.index(cast(StateChanged, reached(f"/chain/{k}", State.COMPLETE)(ev))) for k in ("t1", "t2", "t3")}
        t2_moved = ev.index(cast(StateChanged, reached("/chain/t2", State.SUBMITTED, State.ACTIVE, State.COMPLETE)(ev)))
        assert idx["t1"] < t2_moved <= idx["t2"] < idx["t3"], [show(e) for e in ev]
        assert reached("/chain/t1", State.ACTIVE)(ev) is not None, "a 0.6 s job is seen running"
        attrs = [(e.kind, e.name, e.value) for e in run.rec.of(AttributeChanged, "/chain/t1")]
        meters = [v for k, n, v in attrs if k == "meter" and v]
        assert meters == sorted(meters) and meters[-1] == 3
        assert ("event", "ev1", True) in attrs
        assert ("label", "info", "done") in attrs
        assert all(e.observed is Observed.POLL for e in run.rec.of(StateChanged, "/chain/t1"))
        assert ("suite", "chain", True) in [(e.kind, e.name, e.value) for e in run.rec.of(AttributeChanged, "/")]
        assert not missing_finals(server, run, {"/chain/t1", "/chain/t2", "/chain/t3"})
        assert latest_states(run) == server_states(server)

    @pytest.mark.timeout(60)
    def test_server_state_and_suite_removal(self, ecf_server: Server, ecflow_session: Session) -> None:
        """Halt/restart are StateChanged of key '/', and a deleted suite's nodes go UNKNOWN with the suite attribute False."""
        server = ecf_server()
        run = ecflow_session(server.port)
        assert cast(StateChanged, reached("/", State.ACTIVE)(run.rec.events)).native == "RUNNING"
        run.call("load", write_suite(server, "d", "family f\n  task t\n    defstatus complete\nendfamily\n", {}))
        run.rec.wait_for(reached("/d/f/t", State.UNKNOWN), 10, "t loaded")
        run.call("halt_server")
        halted = run.rec.wait_for(reached("/", State.SUSPENDED), 10, "halted")
        assert halted.native == "HALTED" and halted.native_previous == "RUNNING"
        run.call("restart_server")
        run.rec.wait_for(lambda es: [e for e in es[es.index(halted):] if isinstance(e, StateChanged)
                                     and e.key == "/" and e.native == "RUNNING"], 10, "running again")
        run.call("delete", "/d", True)
        run.rec.wait_for(lambda es: [e for e in es if isinstance(e, AttributeChanged) and e.kind == "suite"
                                     and e.value is False], 10, "suite removed")
        gone = {e.key: e for e in run.rec.of(StateChanged) if e.detail.startswith("removed")}
        assert set(gone) == {"/d", "/d/f", "/d/f/t"} and gone["/d/f/t"].state is State.UNKNOWN
        assert latest_states(run) == server_states(server) == {}


class TestControl:
    """Operations through call() change the server, and the changes come back as events."""

    @pytest.mark.timeout(60)
    def test_abort_retried_by_ecf_tries_then_requeue(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A failing task is retried by ECF_TRIES (try numbers 1, 2 visible), then a requeue after a fix completes it."""
        server = ecf_server()
        run = ecflow_session(server.port)
        body = "task fail\n"
        script = {"fail": '[ "%SHOULD_FAIL:1%" = 0 ] || exit 3\n'}
        run.call("load", write_suite(server, "retry", body, script, tries=2))
        run.call("begin_suite", "retry")
        second = run.rec.wait_for(reached("/retry/fail", State.ABORTED, try_no=2), 20, "abort on try 2")
        first = reached("/retry/fail", State.ABORTED, try_no=1)(run.rec.events)
        assert first is not None, [show(e) for e in run.rec.events]
        assert second.native == "aborted" and second.detail == "trap"
        assert run.call("query", "state", "/retry/fail") == "aborted"
        run.call("alter", "/retry/fail", "add", "variable", "SHOULD_FAIL", "0")
        run.call("requeue", "/retry/fail")
        done = run.rec.wait_for(reached("/retry/fail", State.COMPLETE), 20, "complete after requeue")
        assert done.try_no == 1, show(done)
        assert not missing_finals(server, run, {"/retry/fail"})

    @pytest.mark.timeout(60)
    def test_suspend_and_resume(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A task suspended before begin is SUSPENDED (native 'suspended') and completes once resumed."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "sr", "task t\n", {"t": "true\n"}))
        run.call("suspend", "/sr/t")
        run.call("begin_suite", "sr")
        got = run.rec.wait_for(reached("/sr/t", State.SUSPENDED), 10, "suspended")
        assert got.native == "suspended"
        assert reached("/sr/t", State.SUBMITTED, State.ACTIVE, State.COMPLETE)(run.rec.events) is None
        run.call("resume", "/sr/t")
        run.rec.wait_for(reached("/sr/t", State.COMPLETE), 10, "complete after resume")

    @pytest.mark.timeout(60)
    def test_force_event_and_generic_client_call(self, ecf_server: Server, ecflow_session: Session) -> None:
        """force_event is seen as an event attribute; any Client method is reachable by name with plain results."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "g", "task t\n  event go\n  defstatus suspended\n", {"t": "true\n"}))
        run.call("force_event", "/g/t:go", "set")
        ev = run.rec.wait_for(lambda es: [e for e in es if isinstance(e, AttributeChanged) and e.name == "go"
                                          and e.value is True], 10, "event go set")
        assert ev[0].kind == "event" and ev[0].key == "/g/t"
        assert run.call("client", "suites") == ["g"]
        assert "suite g" in run.call("get_defs")
        run.call("client", "get_server_defs")  # replaces the session's copy: still consistent below
        assert "suite g" in str(run.call("client", "get_defs"))
        assert isinstance(run.call("server_version"), str)
        for result in (run.call("get_defs"), run.call("suites"), run.call("query", "dstate", "/g/t"),
                       run.call("client", "get_defs"), run.call("client", "ch_suites")):
            pickle.dumps(result)
        log = run.call("client", "get_log", 100)
        assert isinstance(log, str) and "--load" in log, log[-500:]
        with pytest.raises(BackendRejected, match="not a public"):
            run.call("client", "_no_such")
        for breaking in (("set_host_port", "x", "1"), ("set_user_name", "x"), ("reset",), ("enable_ssl",)):
            with pytest.raises(BackendRejected, match=rf"'{breaking[0]}' is refused on session 'e0'"):
                run.call("client", *breaking)
        from flowbus.services.ecflow._ops import _REFUSED
        for name, why in _REFUSED.items():  # every one, with the reason named; nothing reaches the client
            with pytest.raises(BackendRejected, match=re.escape(f"'{name}' is refused on session 'e0': {why}")):
                run.call("client", name, "x")
        assert run.call("suites") == ["g"]  # the session still works
        run.call("alter", "/g/t", "change", "event", "go", "clear")
        run.rec.wait_for(lambda es: [e for e in es if isinstance(e, AttributeChanged) and e.name == "go"
                                     and e.value is False], 10, "event go cleared")


    @pytest.mark.timeout(60)
    def test_common_operations_accepted(self, ecf_server: Server, ecflow_session: Session) -> None:
        """The typed operations and a few generic ones run against a real server and return plain data."""
        server = ecf_server()
        run = ecflow_session(server.port)
        text = write_suite(server, "o", "task t\n  label l \"\"\ntask u\n  trigger t == complete\n",
                           {"t": "sleep 30\n", "u": "true\n"})
        run.call("load", text)
        (server.home / "o.def").write_text(text.replace('label l ""', 'label l "x"'))
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
            ("check", (), {}), ("check", ("/o",), {}), ("get_file", ("/o/t",), {}), ("begin_suite", ("o",), {}),
            ("run", ("/o/t",), {}), ("kill", ("/o/t",), {}),
            ("replace", ("/o/u",), {"path": str(server.home / "o.def")}), ("checkpt", (), {}),
            ("checkpt", ("on_time", 60), {}), ("client", ("order", "/o/u", "top"), {}),
            ("client", ("free_trigger_dep", "/o/u"), {}), ("client", ("job_generation", "/o"), {}),
            ("shutdown_server", (), {}), ("restart_server", (), {}), ("get_file", ("/o/t", "job"), {}),
            ("force_state_recursive", ("/o", "complete"), {}), ("requeue", ("/o", "force"), {}),
            ("client", ("zombie_get", 0), {}), ("begin_all_suites", (True,), {}), ("delete", ("/o", True), {}),
            ("halt_server", (), {}), ("restore_from_checkpt", (), {}), ("restart_server", (), {}),
        ]
        results = {f"{op}{args}": run.call(op, *args, **kw) for op, args, kw in calls}
        pickle.dumps(results)
        assert "sleep 30" in results["get_file('/o/t',)"]
        assert "ECF_NAME=/o/t" in results["get_file('/o/t', 'job')"]
        assert run.call("suites") == ["o"]  # restored from the checkpoint
        assert run.session.phase == "up"


class TestResync:
    """start() compares the server with the journal's last events and publishes differences as resync."""

    @pytest.mark.timeout(30)
    def test_start_diffs_against_known(self, ecf_server: Server, ecflow_session: Session) -> None:
        """Stale states are corrected, unchanged ones stay silent, and nodes the server lacks go UNKNOWN."""
        server = ecf_server()
        first = ecflow_session(server.port)
        first.call("load", write_suite(server, "k", "task a\n  defstatus complete\n  label l \"x\"\ntask b\n"
                                       "  defstatus suspended\n", {}))
        first.call("begin_suite", "k")
        first.rec.wait_for(reached("/k/b", State.SUSPENDED), 10, "b suspended")
        first.pause()
        known = {e.topic(): e for e in first.rec.events if isinstance(e, (StateChanged, AttributeChanged))}
        stale = StateChanged(source="e1", backend="ecflow", key="/k/b", state=State.QUEUED, native="queued")
        phantom = StateChanged(source="e1", backend="ecflow", key="/k/gone", state=State.ACTIVE, native="active")
        known = {k: msgspec.structs.replace(e, source="e1") for k, e in known.items()}
        known[stale.topic()] = stale
        known[phantom.topic()] = phantom
        second = ecflow_session(server.port, known=known, poll=False)
        diff = [e for e in second.rec.events if isinstance(e, (StateChanged, AttributeChanged))]
        assert {(e.key, cast(StateChanged, e).native) for e in diff} == {("/k/b", "suspended"), ("/k/gone", "")}, [show(e) for e in diff]
        assert all(e.observed is Observed.RESYNC for e in diff)
        assert second.rec.of(Resynced)[0].changed == 2


class TestRelease:
    """release() lets go of the server for a newer incarnation: nothing published, the work runs on,
    only the session's own change handle is dropped."""

    @pytest.mark.timeout(60)
    def test_release_leaves_the_server_to_the_next_session(self, ecf_server: Server, ecflow_session: Session) -> None:
        """Nothing is published: the server runs on with its running task, and the change handle the
        session registered is dropped (no server-side state is left behind); a new session on the
        same host:port resyncs without a difference and sees the task complete."""
        server = ecf_server()
        gate = server.home / "gate"
        first = ecflow_session(server.port)
        first.call("load", write_suite(server, "rel", "task t\n", {"t": f"while [ ! -e {gate} ]; do sleep 0.1; done\n"}))
        handle = first.call("ch_register", False, ["rel"])
        first.call("begin_suite", "rel")
        first.rec.wait_for(reached("/rel/t", State.ACTIVE), 20, "t active")
        first.pause()  # the host stops polling a fenced session before it releases it
        mark = len(first.rec.events)
        first.session.release()
        first.session.release()
        first.session.stop()
        first.session.kill()
        assert len(first.rec.events) == mark, [show(e) for e in first.rec.events[mark:]]
        with pytest.raises(BackendUnavailable):
            first.call("ping")
        assert server.proc is not None and server.proc.poll() is None
        assert server_states(server)["/rel/t"] == "active"
        with pytest.raises(RuntimeError, match="does not exist"):
            server.client().ch_drop(handle)  # release dropped it already
        known = {e.topic(): msgspec.structs.replace(e, source="e1") for e in first.rec.events
                 if isinstance(e, (StateChanged, AttributeChanged))}
        second = ecflow_session(server.port, known=known)
        assert second.rec.of(Connected)[0].address == first.session.address
        assert second.rec.of(Resynced)[0].changed == 0, [show(e) for e in second.rec.events]
        gate.touch()
        done = second.rec.wait_for(reached("/rel/t", State.COMPLETE), 20, "t complete (second session)")
        assert done.observed is Observed.POLL
        assert len(first.rec.events) == mark


class TestServerLog:
    """The server logs every poll; clear-log-interval keeps that log from growing."""

    @pytest.mark.timeout(30)
    def test_clear_log_interval(self, ecf_server: Server, ecflow_session: Session) -> None:
        """With clear-log-interval set, the server's log is emptied while the session polls."""
        server = ecf_server()
        run = ecflow_session(server.port, clear_log_interval=0.2)
        run.call("load", write_suite(server, "cl", "task t\n", {}))
        log = server.home / "ecf.log"
        deadline = time.monotonic() + 10
        while "--load" in log.read_text():
            assert time.monotonic() < deadline, "the server log was never cleared"
            time.sleep(0.05)
        assert run.call("suites") == ["cl"]


class TestBadInput:
    """Refused requests raise BackendRejected with the server's words; the session keeps running."""

    @pytest.mark.timeout(30)
    def test_unknown_path_defs_errors_and_unknown_operation(self, ecf_server: Server, ecflow_session: Session) -> None:
        """An unknown node path and a definition with errors are rejected with ecFlow's message."""
        server = ecf_server()
        run = ecflow_session(server.port)
        with pytest.raises(BackendRejected, match="/nope/t"):
            run.call("suspend", "/nope/t")
        with pytest.raises(BackendRejected, match=r"(?i)trigger|expression|parse|error"):
            run.call("load", "suite bad\n  task t\n    trigger ((( == \nendsuite\n")
        with pytest.raises(BackendRejected):
            run.call("alter", "/nope", "change", "bogus", "x", "y")
        with pytest.raises(BackendRejected, match="force_state"):
            run.call("force_state", "/x", "not-a-state")
        with pytest.raises(UnknownOperation):
            run.call("no_such_op")
        with pytest.raises(BackendRejected):
            run.call("suspend")  # missing argument
        with pytest.raises(BackendRejected) as info:
            run.call("delete", "/nope")
        again = pickle.loads(pickle.dumps(info.value))
        assert type(again) is BackendRejected and str(again) == str(info.value)
        run.call("ping")
        assert run.session.phase == "up"

    @pytest.mark.timeout(10)
    def test_unreachable_port_opens_disconnected(self) -> None:
        """start() against a port nobody listens on returns within its timeout with the session
        down: Disconnected (will retry) names why, and calls name the session."""
        from flowbus.demo import free_port
        from support.recorder import Recorder

        session = EcflowSession(EcflowSessionConfig(name="dead", host="127.0.0.1", port=free_port(), timeout=0.3))
        assert isinstance(session, BackendSession)
        rec = Recorder()
        t0 = time.monotonic()
        session.start(rec, {})
        assert time.monotonic() - t0 < 2.0
        assert session.phase == "down"
        down = [e for e in rec.events if isinstance(e, Disconnected)]
        assert len(down) == 1 and down[0].will_retry and "connect" in down[0].reason.lower(), rec.events
        with pytest.raises(BackendUnavailable, match="session 'dead' is disconnected"):
            session.call("ping")
        session.kill()

    @pytest.mark.timeout(20)
    def test_silent_server_times_out(self) -> None:
        """A port that accepts but never answers ends start() disconnected after request-timeout, not ecFlow's 20 s."""
        from support.recorder import Recorder

        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)  # the kernel completes connections; nobody ever reads or answers
            port = silent.getsockname()[1]
            session = EcflowSession(EcflowSessionConfig(name="mute", host="127.0.0.1", port=port, timeout=0.0,
                                                        request_timeout=1))
            rec = Recorder()
            t0 = time.monotonic()
            session.start(rec, {})
            assert time.monotonic() - t0 < 3.0
            assert session.phase == "down"
            assert [e for e in rec.events if isinstance(e, Disconnected)], rec.events
            session.kill()


RECOVERY = """\
task t1
  label info ""
task t2
  defstatus suspended
task t3
  trigger t1 == complete and t2 == complete
"""
RECOVERY_SCRIPTS = {"t1": "sleep 1\n", "t2": "true\n", "t3": "true\n"}


class TestRecovery:
    """A lost server is reported at once, reconnected with backoff, and resynced from its checkpoint."""

    @pytest.mark.timeout(90)
    def test_kill9_mid_suite_restart_from_checkpoint(self, ecf_server: Server, ecflow_session: Session) -> None:
        """kill -9 gives Disconnected within two polls; the restarted HALTED server is restarted by policy,
        changes made while away arrive as resync, and the suite then completes as the server says."""
        server = ecf_server()
        run = ecflow_session(server.port, poll_interval=0.1, restart_halted=True)
        run.call("checkpt", "always")
        run.call("load", write_suite(server, "rec", RECOVERY, RECOVERY_SCRIPTS))
        run.call("begin_suite", "rec")
        run.rec.wait_for(reached("/rec/t1", State.ACTIVE), 20, "t1 active")
        killed = time.monotonic()
        server.kill9()
        run.rec.wait_for(lambda es: [e for e in es if isinstance(e, Disconnected)], 5, "Disconnected")
        gone = run.rec.of(Disconnected)[0]
        lost_after = run.rec.times[run.rec.events.index(gone)] - killed
        assert gone.will_retry and "connect" in gone.reason.lower(), gone.reason
        assert lost_after <= 2 * 0.1, f"Disconnected {lost_after:.3f} s after kill -9"
        run.pause()
        server.start(restart=False)  # from the checkpoint, HALTED
        other = server.client()
        assert "rec" in list(other.suites())
        other.alter("/rec/t1", "change", "label", "info", "while-away")
        other.resume("/rec/t2")  # the server is HALTED: t2 is queued, not run
        n_before = len(run.rec.events)
        run.resume()
        run.rec.wait_for(lambda es: [e for e in es[n_before:] if isinstance(e, Resynced)], 10, "resynced")
        after = run.rec.events[n_before:]
        assert [type(e) for e in after[:2]] == [RecoveryAttempted, Connected], [show(e) for e in after]
        away = [(e.key, getattr(e, "value", None) or getattr(e, "native", "")) for e in after
                if isinstance(e, (StateChanged, AttributeChanged)) and e.observed is Observed.RESYNC]
        assert ("/rec/t1", "while-away") in away, away
        assert any(k == "/rec/t2" for k, _ in away), away
        assert run.rec.of(RecoveryAttempted)[-1].action == "reconnect"
        run.rec.wait_for(reached("/rec/t3", State.COMPLETE), 40, "t3 complete after restart")
        run.rec.wait_for(reached("/rec", State.COMPLETE), 10, "suite complete")
        run.pause()
        assert latest_states(run) == server_states(server)
        assert not missing_finals(server, run, {"/rec/t1", "/rec/t2", "/rec/t3"})
        run.resume()

    @pytest.mark.timeout(60)
    def test_handle_reregistered_after_restart_between_polls(self, ecf_server: Server,
                                                             ecflow_session: Session) -> None:
        """A ch_register handle the restarted server no longer knows is registered again, with a resync."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("checkpt", "always")
        run.call("load", write_suite(server, "h", "task t\n  defstatus suspended\n  label l \"\"\n", {"t": "true\n"}))
        handle = run.call("ch_register", False, ["h"])
        assert handle > 0
        run.call("begin_suite", "h")
        run.rec.wait_for(reached("/h/t", State.SUSPENDED), 10, "t seen")
        run.pause()  # the server dies and comes back between two polls: no Disconnected is seen
        server.kill9()
        server.start()
        server.client().alter("/h/t", "change", "label", "l", "meanwhile")
        n_before = len(run.rec.events)
        run.resume()
        run.rec.wait_for(lambda es: [e for e in es[n_before:] if isinstance(e, Resynced)], 10, "resynced")
        after = run.rec.events[n_before:]
        assert [e.action for e in after if isinstance(e, RecoveryAttempted)] == ["ch_register"], \
            [show(e) for e in after]
        label = [e for e in after if isinstance(e, AttributeChanged) and e.name == "l"]
        assert label and label[0].value == "meanwhile" and label[0].observed is Observed.RESYNC
        assert run.call("client", "ch_handle") > 0
        run.call("alter", "/h/t", "change", "label", "l", "again")
        got = run.rec.wait_for(lambda es: [e for e in es if isinstance(e, AttributeChanged) and e.value == "again"],
                               10, "label through the new handle")
        assert got[0].observed is Observed.POLL


    @pytest.mark.timeout(60)
    def test_plain_client_sees_restart_between_polls(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A server restarted between two polls is noticed by its new pid: Disconnected, Connected, resync diff."""
        server = ecf_server()
        run = ecflow_session(server.port, restart_halted=True)
        run.call("checkpt", "always")
        run.call("load", write_suite(server, "p", "task t\n  defstatus suspended\n  label l \"\"\n", {}))
        run.call("begin_suite", "p")
        run.rec.wait_for(reached("/p/t", State.SUSPENDED), 10, "t seen")
        run.pause()
        server.kill9()
        server.start(restart=False)  # HALTED: the session's policy restarts it
        server.client().alter("/p/t", "change", "label", "l", "meanwhile")
        n_before = len(run.rec.events)
        run.resume()
        run.rec.wait_for(lambda es: [e for e in es[n_before:] if isinstance(e, Resynced)], 10, "resynced")
        after = run.rec.events[n_before:]
        assert isinstance(after[0], Disconnected) and "restarted" in after[0].reason, [show(e) for e in after]
        assert [type(e) for e in after[1:3]] == [RecoveryAttempted, Connected]
        label = [e for e in after if isinstance(e, AttributeChanged) and e.name == "l"]
        assert label and label[0].value == "meanwhile" and label[0].observed is Observed.RESYNC
        probe = server.client()
        probe.sync_local()
        assert str(probe.get_defs().get_server_state()) == "RUNNING", "restart-halted policy did not restart it"
        run.pause()
        assert latest_states(run) == server_states(server)


    @pytest.mark.timeout(30)
    def test_gives_up_after_reconnect_attempts(self, ecf_server: Server, ecflow_session: Session) -> None:
        """With reconnect-attempts set, a server that stays dead ends in RecoveryGaveUp; calls then fail fast."""
        server = ecf_server()
        run = ecflow_session(server.port, reconnect_attempts=3, reconnect_backoff=0.01)
        server.kill9()
        gave = run.rec.wait_for(lambda es: [e for e in es if isinstance(e, RecoveryGaveUp)], 10, "gave up")
        assert gave[0].attempts == 3
        assert run.session.phase == "dead"
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match="session 'e0' gave up reconnecting"):
            run.call("ping")
        assert time.monotonic() - t0 < 0.5


class TestIsolation:
    """One dead server never stalls the other sessions of the process (the GIL trap)."""

    @pytest.mark.timeout(60)
    def test_dead_server_does_not_stall_live_session(self, ecf_server: Server, ecflow_session: Session) -> None:
        """While one session's server is dead and being reconnected, the other keeps its poll cadence."""
        live_srv, dead_srv = ecf_server(), ecf_server()
        live = ecflow_session(live_srv.port, poll_interval=0.05)
        dead = ecflow_session(dead_srv.port, poll_interval=0.05, reconnect_backoff=0.01)
        live.call("load", write_suite(live_srv, "m", "task t\n  meter m 0 20 20\n",
                                      {"t": "for i in $(seq 1 20); do ecflow_client --meter=m $i; sleep 0.1; done\n"}))
        dead_srv.kill9()
        dead.rec.wait_for(lambda es: [e for e in es if isinstance(e, Disconnected)], 5, "dead session lost")
        start = time.monotonic()
        live.call("begin_suite", "m")
        live.rec.wait_for(reached("/m/t", State.COMPLETE), 30, "meter task complete")
        window = [t for t in live.polls if t >= start]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        assert len(window) > 20 and max(gaps) < 0.5, f"live polls: {len(window)}, max gap {max(gaps):.3f} s"
        meters = [e.value for e in live.rec.of(AttributeChanged, "/m/t") if e.kind == "meter"]
        assert len(meters) >= 5 and meters == sorted(meters), meters
        assert dead.session.phase == "down"
        assert dead.durations and max(dead.durations[-50:]) < 0.1, "a poll against a dead server must fail fast"


class TestScale:
    """A 5,000-task suite: the full read happens once, later polls read only the changed nodes."""

    @pytest.mark.timeout(120)
    def test_five_thousand_tasks(self, ecf_server: Server, ecflow_session: Session) -> None:
        """5,050 nodes are published after begin; one label change is one event; a family force is 101 events."""
        server = ecf_server()
        run = ecflow_session(server.port, poll_interval=0.1)
        fams = "".join(
            f"family f{f}\n" + "".join(f"  task t{t}\n    event e\n    meter m 0 10\n    label l \"\"\n"
                                       for t in range(100)) + "endfamily\n" for f in range(50))
        run.call("load", write_suite(server, "big", "defstatus suspended\n" + fams, {}))
        run.call("begin_suite", "big")
        run.rec.wait_for(lambda es: len(latest_states(run)) == 1 + 50 + 5000 and reached(
            "/big/f49/t99", State.QUEUED)(es), 60, "all 5,051 nodes")
        assert len({e.key for e in run.rec.of(AttributeChanged) if e.key.startswith("/big/")}) == 5000
        n = len(run.rec.events)
        run.call("alter", "/big/f7/t42", "change", "label", "l", "hello")
        got = run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, AttributeChanged)], 10, "label")
        run.call("force_state_recursive", "/big/f3", "complete")
        run.rec.wait_for(reached("/big/f3/t99", State.COMPLETE), 10, "family forced")
        run.pause()
        later = run.rec.events[n:]
        assert [(e.key, e.value) for e in later if isinstance(e, AttributeChanged)] == [("/big/f7/t42", "hello")]
        forced = {e.key for e in later if isinstance(e, StateChanged) and e.native == "complete"}
        assert {k for k in forced if k.startswith("/big/f3")} == {"/big/f3"} | {f"/big/f3/t{t}" for t in range(100)}
        assert got[0].observed is Observed.POLL
        assert latest_states(run) == server_states(server)
        idle = []
        for _ in range(10):  # nothing changes now: each poll is one news request, no read
            t0 = time.perf_counter()
            run.session.poll()
            idle.append(time.perf_counter() - t0)
        assert min(idle) < 0.02, f"an idle poll of 5,000 tasks took {min(idle):.3f} s"


class TestTree:
    """The diff bookkeeping on its own (no server)."""

    def test_partial_read_removal_and_retry_visible(self) -> None:
        """A try-number change alone is an event, a gone path removes its subtree, attributes keep previous values."""
        from flowbus.services.ecflow._tree import NodeObs, Snapshot, Tree

        tree = Tree("s")
        full = Snapshot(full=True, server="RUNNING", suites=["a"],
                        nodes={"/a": NodeObs("aborted"), "/a/f": NodeObs("aborted"),
                               "/a/f/t": NodeObs("aborted", 1, "trap")},
                        attrs={("/a/f/t", "meter", "m"): 1})
        first = tree.diff(full, Observed.RESYNC)
        assert [e.key for e in first if isinstance(e, StateChanged)] == ["/", "/a", "/a/f", "/a/f/t"]
        retry = tree.diff(Snapshot(full=False, server="RUNNING", suites=["a"],
                                   nodes={"/a/f/t": NodeObs("aborted", 2, "trap")},
                                   attrs={("/a/f/t", "meter", "m"): 3}), Observed.POLL)
        # the retry left aborted and came back: the task, then its family and suite (no sibling held aborted)
        assert [(type(e).__name__, e.key) for e in retry] == [("StateChanged", "/a/f/t"), ("AttributeChanged", "/a/f/t"),
                                                              ("StateChanged", "/a/f"), ("StateChanged", "/a")]
        assert all(e.attrs == {"rerun": True} for e in retry[2:] if isinstance(e, StateChanged))
        assert cast(StateChanged, retry[0]).try_no == 2
        assert cast(AttributeChanged, retry[1]).previous == 1 and cast(AttributeChanged, retry[1]).value == 3
        gone = tree.diff(Snapshot(full=False, server="RUNNING", suites=["a"], gone=["/a/f"]), Observed.POLL)
        assert {e.key for e in gone} == {"/a/f", "/a/f/t"} and all(cast(StateChanged, e).state is State.UNKNOWN for e in gone)
        assert tree.diff(Snapshot(full=False, server="RUNNING", suites=["a"]), Observed.POLL) == []
