"""The Orchestrator actor on a real broker, a real (loopback-only) Ray and real backends (an
ecflow_server, a QCG-PilotJob manager): rules chaining backends, restarts in the middle of an
all-of and of an absence timer, recovery policies, failing actions and rejected rules."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from support import ecflow as _fx
from support.ecflow import EcfServer, write_suite
from support.guiserver import emulator_fixture

pytestmark = [pytest.mark.ray, pytest.mark.qcg]

ray = pytest.importorskip("ray")

from flowbus.actors import Orchestrator, Supervisor
from flowbus.bus import Client, Publisher
from flowbus.schemas import (
    ConfigError,
    ErrorEvent,
    Event,
    FlowbusConfig,
    LogLine,
    RecoveryAttempted,
    RecoveryGaveUp,
    RuleFired,
    State,
    StateChanged,
    WaitTimeout,
    parse_config,
)

ecf_server = _fx.ecf_server
emulator = emulator_fixture

QCG = {"backend": "qcg", "name": "q1", "reconcile-interval": 0.5}


def journal(client: Client, prefix: str) -> list[Event]:
    """Everything the broker's journal holds under ``prefix`` (after a catch-up)."""
    with client.subscribe(prefix, start="journal") as sub:
        sub.sync()
        out: list[Event] = []
        while (batch := sub.recv_many(0.2)):
            out.extend(batch)
        return out


def in_journal(client: Client, prefix: str, match: Callable[[Event], bool], timeout: float = 60.0) -> Event:
    """The first event under ``prefix`` for which ``match`` is true, from the journal on, then live
    (so an event published before this call is found too)."""
    deadline = time.monotonic() + timeout
    with client.subscribe(prefix, start="journal") as sub:
        while (left := deadline - time.monotonic()) > 0:
            ev = sub.recv(left)
            if ev is not None and match(ev):
                return ev
    raise AssertionError(f"no matching event under {prefix!r} within {timeout} s")


def poll(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check()`` until it is truthy (a bounded loop for state that has no event)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class System:
    """Broker + Supervisor + Orchestrator (unique Ray names), stopped at teardown."""

    def __init__(self, broker: Any, tmp_path: Path) -> None:
        self.broker, self.tmp = broker, tmp_path
        self.client = Client(broker.address)
        self.sup: Any = None
        self.orch: Any = None
        self.feeder: Publisher | None = None

    def start(self, raw: dict[str, Any]) -> System:
        raw = {"ray": {"namespace": "flowbus-test"}, "state-dir": str(self.tmp / "state"), **raw}
        for s in raw.get("sessions", []):
            if s["backend"] == "qcg":
                s.setdefault("wd", str(self.tmp / f"qcg-{s['name']}"))
        self.config: FlowbusConfig = parse_config(raw, "test")
        tag = uuid.uuid4().hex[:8]
        self.sup = Supervisor.options(name=f"sup-{tag}").remote(msgspec.json.encode(self.config), self.broker.address)
        ray.get(self.sup.start.remote(), timeout=120)
        self.orch = Orchestrator.options(name=f"orch-{tag}").remote(
            msgspec.json.encode(self.config), self.broker.address, supervisor=f"sup-{tag}",
            checkpoint=str(self.tmp / "orch" / "checkpoint.msgpack"))
        info = ray.get(self.orch.start.remote(), timeout=120)
        assert info["started"], info
        return self

    def feed(self, key: str, state: str) -> None:
        """Publish a StateChanged of source ``feeder`` (backend flowbus) and wait until journaled."""
        if self.feeder is None:
            self.feeder = Publisher(self.broker.address)
            self.feeder.open_source("feeder", "flowbus")
        self.feeder.publish(StateChanged(source="feeder", backend="flowbus", key=key, state=State(state)))
        self.feeder.flush(10)

    def status(self) -> dict[str, Any]:
        return ray.get(self.orch.status.remote(), timeout=30)  # type: ignore[no-any-return]  # status() answers a dict

    def restart_orchestrator(self) -> None:
        """Kill the actor's process; Ray restarts it and it resumes from its checkpoint by itself."""
        old = ray.get(self.orch.ping.remote(), timeout=30)["pid"]
        ray.kill(self.orch, no_restart=False)

        def back() -> bool:
            try:
                info = ray.get(self.orch.ping.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False
            return bool(info["started"] and info["pid"] != old)

        poll("the orchestrator restarted by Ray", back, timeout=120)

    def close(self) -> None:
        if self.feeder is not None:
            self.feeder.close()
        self.client.close()
        if self.orch is not None:
            try:
                ray.get(self.orch.stop.remote(), timeout=30)
            finally:
                ray.kill(self.orch, no_restart=True)
        if self.sup is not None:
            ray.get(self.sup.stop.remote(), timeout=90)
            ray.kill(self.sup)


@pytest.fixture
def system(ray_local: str, broker_factory: Any, tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], System]]:
    made: list[System] = []

    def make(raw: dict[str, Any]) -> System:
        s = System(broker_factory(), tmp_path)
        made.append(s)
        return s.start(raw)

    yield make
    for s in made:
        s.close()


def count(events: list[Event], cls: type[Any], **fields: Any) -> int:
    return sum(1 for e in events if isinstance(e, cls) and all(getattr(e, k) == v for k, v in fields.items()))


class TestRules:
    @pytest.mark.timeout(300)
    def test_ecflow_task_complete_starts_a_qcg_ensemble_then_a_publish(
            self, system: Callable[[dict[str, Any]], System], ecf_server: Callable[..., EcfServer]) -> None:
        """ecFlow /s/ingest complete -> QCG ensemble of 3 submitted; all 3 iterations done -> an event published."""
        server = ecf_server()
        sys_ = system({
            "sessions": [{"backend": "ecflow", "name": "e1", "host": "127.0.0.1", "port": server.port}, dict(QCG)],
            "rules": [
                {"name": "ingest-done", "when": "ecflow/e1/state//s/ingest state=complete",
                 "then": [{"call": {"session": "q1", "operation": "submit",
                                    "args": [[{"name": "ens", "exec": "/bin/echo", "args": ["from {key}"],
                                               "iteration": 3}]]}}]},
                {"name": "ensemble-done", "when": {"count": "qcg/q1/state/ens:* state=complete", "n": 3},
                 "then": [{"publish": {"type": "log", "key": "ens", "level": "info", "message": "ensemble {rule} done"}}]},
            ]})
        client = sys_.client
        text = write_suite(server, "s", "task ingest\n", {"ingest": "true\n"})
        with client.expect("flowbus/*/log/ens", timeout=120) as w:
            sup = sys_.sup
            ray.get(sup.call.remote("e1", "load", [text], {}), timeout=60)
            ray.get(sup.call.remote("e1", "begin_suite", ["s"], {}), timeout=60)
        assert isinstance(w.event, LogLine) and w.event.message == "ensemble ensemble-done done"
        assert client.wait("qcg/q1/state/ens state=complete", timeout=60).key == "ens"
        fired = journal(client, "flowbus/")
        assert count(fired, RuleFired, rule="ingest-done") == 1
        assert count(fired, RuleFired, rule="ensemble-done") == 1

    @pytest.mark.timeout(420)
    def test_the_issue_example_ecflow_qcg_soma_difx(self, system: Callable[[dict[str, Any]], System],
                                                    ecf_server: Callable[..., EcfServer], emulator: Any,
                                                    tmp_path: Path) -> None:
        """ecFlow ingest complete -> QCG ensemble of 3; all 3 succeeded -> a soma-workflow workflow;
        a fatal alert of the DiFX job -> stop it, and once it stopped, start it again with force."""
        from flowbus.services.guiserver import messages as gx

        server = ecf_server()
        emu = emulator(outcomes={"obs_1": "slow"}, slow_ticks=100_000)
        emu.real("/data/exp/obs_1.input").write_text("# fake\n")
        fatal = "guiserver/difx/log/obs_1 stream=alert level=critical"
        sys_ = system({
            "sessions": [{"backend": "ecflow", "name": "e1", "host": "127.0.0.1", "port": server.port}, dict(QCG),
                         {"backend": "soma", "name": "sm", "directory": str(tmp_path / "soma")},
                         {"backend": "guiserver", "name": "difx", "port": emu.port, "allowed-dirs": ["/data"]}],
            "rules": [
                {"name": "ingest-done", "when": "ecflow/e1/state//s/ingest state=complete",
                 "then": [{"call": {"session": "q1", "operation": "submit",
                                    "args": [[{"name": "ens", "exec": "/bin/true", "iteration": 3}]]}}]},
                {"name": "ensemble-done", "when": {"count": "qcg/q1/state/ens:* state=complete", "n": 3},
                 "then": [{"call": {"session": "sm", "operation": "submit",
                                    "args": [{"name": "post", "jobs": [{"name": "p", "command": ["/bin/true"]}]}]}}]},
                {"name": "difx-fatal", "when": fatal,
                 "then": [{"call": {"session": "difx", "operation": "stop_job", "args": ["{key}"]}}]},
                {"name": "difx-restart", "when": {"sequence": [fatal, "guiserver/difx/state/obs_1 state=cancelled"]},
                 "then": [{"call": {"session": "difx", "operation": "start_job", "args": ["/data/exp/obs_1.input"],
                                    "kwargs": {"force": True}}}]},
            ]})
        client, sup = sys_.client, sys_.sup
        text = write_suite(server, "s", "task ingest\n", {"ingest": "true\n"})
        with client.expect("soma/sm/state/* native=workflow_done state=complete", timeout=180) as w:
            ray.get(sup.call.remote("e1", "load", [text], {}), timeout=60)
            ray.get(sup.call.remote("e1", "begin_suite", ["s"], {}), timeout=60)
        assert isinstance(w.event, StateChanged)

        with client.expect("guiserver/difx/state/obs_1 state=active", timeout=60):
            ray.get(sup.call.remote("difx", "start_job", ["/data/exp/obs_1.input"], {}), timeout=60)
        with client.expect("flowbus/*/rule/difx-restart", timeout=90):
            emu.inject(gx.alert_message("obs_1", "datastream died", 0))
        states = [e.state for e in journal(client, "guiserver/difx/state/obs_1") if isinstance(e, StateChanged)]
        assert State.CANCELLED in states
        client.wait("guiserver/difx/state/obs_1 state=active", timeout=60)  # running again
        fired = journal(client, "flowbus/")
        assert [count(fired, RuleFired, rule=r) for r in ("ingest-done", "ensemble-done", "difx-fatal", "difx-restart")] \
            == [1, 1, 1, 1]
        assert count(fired, ErrorEvent) == 0
        ray.get(sup.call.remote("difx", "stop_job", ["obs_1"], {}), timeout=60)

    @pytest.mark.timeout(300)
    def test_restart_in_the_middle_of_an_all_of_fires_once(self, system: Callable[[dict[str, Any]], System]) -> None:
        """Half of an all-of, an orchestrator restart, the other half: the rule fires exactly once."""
        sys_ = system({"sessions": [dict(QCG)], "rules": [
            {"name": "both", "when": {"all": ["flowbus/feeder/state/a state=complete", "flowbus/feeder/state/b state=complete"]},
             "then": [{"publish": {"type": "log", "key": "both", "message": "a and b"}}]}]})
        sys_.feed("a", "complete")
        poll("a latched", lambda: sys_.status()["rules"]["both"]["progress"] == "1/2 satisfied")
        sys_.restart_orchestrator()
        assert sys_.status()["rules"]["both"]["progress"] == "1/2 satisfied"
        with sys_.client.expect("flowbus/*/rule/both", timeout=60):
            sys_.feed("b", "complete")
        sys_.feed("b", "complete")  # b again without a: no second firing
        poll("the second b consumed", lambda: sys_.status()["rules"]["both"]["progress"] == "1/2 satisfied")
        sys_.restart_orchestrator()  # the journal is replayed again: a, b, b are skipped as consumed
        both = sys_.status()["rules"]["both"]
        assert (both["fired"], both["progress"]) == (1, "1/2 satisfied")
        fired = journal(sys_.client, "flowbus/")
        assert count(fired, RuleFired, rule="both") == 1
        assert count(fired, LogLine, key="both") == 1

    @pytest.mark.timeout(300)
    def test_restart_with_a_pending_absence_timer_fires_once(self, system: Callable[[dict[str, Any]], System]) -> None:
        """An absence timer pending across an orchestrator restart fires once, not before its deadline."""
        sys_ = system({"sessions": [dict(QCG)], "rules": [
            {"name": "silent", "when": {"absent": "flowbus/feeder/state/x state=complete",
                                        "after": "flowbus/feeder/state/x state=active", "within": 12},
             "then": [{"publish": {"type": "log", "key": "{key}", "level": "alert", "message": "no progress"}}]}]})
        sys_.feed("x", "active")
        started = [e for e in journal(sys_.client, "flowbus/feeder/") if isinstance(e, StateChanged)][-1]
        poll("timer armed", lambda: sys_.status()["rules"]["silent"]["progress"] == "1 timer(s) pending")
        sys_.restart_orchestrator()  # the deadline may pass while it restarts: then it fires on resuming
        ev = in_journal(sys_.client, "flowbus/", lambda e: isinstance(e, RuleFired) and e.rule == "silent", timeout=90)
        assert ev.time >= started.time + 12e9
        poll("timer gone", lambda: sys_.status()["rules"]["silent"]["progress"] == "0 timer(s) pending")
        sys_.restart_orchestrator()  # a replay after the firing does not fire again
        fired = journal(sys_.client, "flowbus/")
        assert count(fired, RuleFired, rule="silent") == 1
        assert count(fired, LogLine, key="x", level="alert") == 1

    @pytest.mark.timeout(240)
    def test_failing_action_is_an_error_event_and_bad_rules_are_rejected(
            self, system: Callable[[dict[str, Any]], System]) -> None:
        """A call the backend refuses gives an ErrorEvent naming the rule; bad rules are named at load, good ones run."""
        sys_ = system({"sessions": [dict(QCG)], "rules": [
            {"name": "bad-op", "when": "flowbus/feeder/state/go", "then": [{"call": {"session": "q1", "operation": "explode"}}]},
            {"name": "bad-session", "when": "qcg/nosuch/state/x"},
            {"name": "refused", "when": "flowbus/feeder/state/go",
             "then": [{"call": {"session": "q1", "operation": "submit", "args": [[{"exec": "/bin/true"}]]}},
                      {"publish": {"type": "log", "key": "never", "message": "not reached"}}]}]})
        info = ray.get(sys_.orch.ping.remote(), timeout=30)
        assert info["rules"] == ["refused"]
        assert "no operation 'explode'" in info["rejected"]["bad-op"]
        assert "unknown qcg session 'nosuch'" in info["rejected"]["bad-session"]
        with sys_.client.expect("flowbus/*/error/refused", timeout=60) as w:
            sys_.feed("go", "active")
        assert isinstance(w.event, ErrorEvent)
        assert w.event.error_type.endswith("BackendRejected") and "name" in w.event.message
        errors = journal(sys_.client, "flowbus/")
        assert count(errors, ErrorEvent, key="bad-op", operation="load") == 1
        assert count(errors, LogLine, key="never") == 0


class TestPolicies:
    @pytest.mark.timeout(300)
    def test_job_that_always_fails_is_retried_then_given_up(self, system: Callable[[dict[str, Any]], System]) -> None:
        """A QCG job that always fails: RecoveryAttempted twice, then RecoveryGaveUp, on the bus."""
        sys_ = system({"sessions": [dict(QCG)], "policies": [
            {"name": "retry-qcg", "match": "qcg/q1/state/*", "max-attempts": 2, "backoff": 0.2}]})
        with sys_.client.expect("flowbus/*/recovery/q1/bad type=recovery.gave_up", timeout=180) as w:
            ray.get(sys_.orch.call.remote("q1", "submit", [[{"name": "bad", "exec": "/bin/false"}]]), timeout=60)
        assert isinstance(w.event, RecoveryGaveUp) and w.event.attempts == 2
        events = journal(sys_.client, "flowbus/")
        attempts = [e for e in events if isinstance(e, RecoveryAttempted) and e.key == "q1/bad"]
        assert [(a.attempt, a.ok) for a in attempts] == [(1, True), (2, True)]
        assert count(events, RecoveryGaveUp, key="q1/bad") == 1
        aborted = [e for e in journal(sys_.client, "qcg/q1/state/bad") if isinstance(e, StateChanged)
                   and e.key == "bad" and e.state is State.ABORTED]
        assert len(aborted) == 3

    @pytest.mark.timeout(240)
    def test_a_backend_that_stays_down_is_given_up(self, system: Callable[[dict[str, Any]], System],
                                                   ecf_server: Callable[..., EcfServer]) -> None:
        """An ecflow_server killed for good: Disconnected, then RecoveryGaveUp for the session after give-up-after."""
        server = ecf_server()
        sys_ = system({"sessions": [{"backend": "ecflow", "name": "e1", "host": "127.0.0.1", "port": server.port}],
                       "policies": [{"name": "ecf-down", "match": "ecflow/e1/state/*", "give-up-after": 2}]})
        sys_.client.wait("ecflow/e1/session/ type=connected", timeout=60)
        with sys_.client.expect("flowbus/*/recovery/e1 type=recovery.gave_up", timeout=90) as w:
            server.kill9()
        assert isinstance(w.event, RecoveryGaveUp) and "disconnected for 2 s" in w.event.reason
        down = sys_.client.wait("ecflow/e1/session/ type=disconnected", timeout=10)
        assert w.event.time >= down.time + 2e9

    @pytest.mark.timeout(300)
    def test_job_that_fails_once_is_recovered(self, system: Callable[[dict[str, Any]], System], tmp_path: Path) -> None:
        """A QCG job that fails the first time only: one RecoveryAttempted, then complete, no give-up."""
        flag = tmp_path / "ran-once"
        script = f"if [ -e {flag} ]; then exit 0; else touch {flag}; exit 1; fi"
        sys_ = system({"sessions": [dict(QCG)], "policies": [
            {"name": "retry-qcg", "match": "qcg/q1/state/*", "max-attempts": 3, "backoff": 0.2}]})
        with sys_.client.expect("qcg/q1/state/flaky state=complete", timeout=180):
            ray.get(sys_.orch.call.remote("q1", "submit", [[{"name": "flaky", "exec": "/bin/sh",
                                                                "args": ["-c", script]}]]), timeout=60)
        assert flag.exists()
        events = journal(sys_.client, "flowbus/")
        assert [(e.attempt, e.ok) for e in events if isinstance(e, RecoveryAttempted)] == [(1, True)]
        assert count(events, RecoveryGaveUp) == 0


    @pytest.mark.timeout(300)
    def test_job_submitted_straight_to_its_session_is_recovered_by_resubmit(
            self, system: Callable[[dict[str, Any]], System], tmp_path: Path) -> None:
        """A QCG job submitted with a plain call to its session (what `flowbus call` and `flowbus
        submit qcg` do), so the orchestrator never saw its spec, fails once: the policy retries it
        through the session's resubmit, and it completes."""
        flag = tmp_path / "ran-once-direct"
        script = f"if [ -e {flag} ]; then exit 0; else touch {flag}; exit 1; fi"
        sys_ = system({"sessions": [dict(QCG)], "policies": [
            {"name": "retry-qcg", "match": "qcg/q1/state/*", "max-attempts": 3, "backoff": 0.2}]})
        with sys_.client.expect("qcg/q1/state/flaky state=complete", timeout=180):
            ray.get(sys_.sup.call.remote("q1", "submit", [[{"name": "flaky", "exec": "/bin/sh",
                                                             "args": ["-c", script]}]], {}), timeout=60)
        assert flag.exists()
        events = journal(sys_.client, "flowbus/")
        attempts = [e for e in events if isinstance(e, RecoveryAttempted)]
        assert [(e.attempt, e.ok) for e in attempts] == [(1, True)], attempts
        assert attempts[0].detail == "policy retry-qcg: resubmit"
        assert count(events, RecoveryGaveUp) == 0 and count(events, ErrorEvent) == 0
        states = [e.state for e in journal(sys_.client, "qcg/q1/state/flaky") if isinstance(e, StateChanged)]
        assert states.count(State.ABORTED) == 1 and states[-1] is State.COMPLETE, states


class TestPythonAPI:
    """flowbus.rules.Rules: the same engine in-process, Python callables as actions (real broker, no Ray)."""

    @pytest.fixture
    def bus(self, broker_factory: Any) -> Iterator[tuple[Client, Callable[[str, str], None]]]:
        broker = broker_factory()
        client = Client(broker.address)
        pub = Publisher(broker.address)
        pub.open_source("feeder", "flowbus")

        def feed(key: str, state: str) -> None:
            pub.publish(StateChanged(source="feeder", backend="flowbus", key=key, state=State(state)))
            pub.flush(10)

        yield client, feed
        pub.close()
        client.close()

    @pytest.mark.timeout(120)
    def test_callbacks_publish_and_exactly_once_across_a_restart(
            self, bus: tuple[Client, Callable[[str, str], None]], tmp_path: Path) -> None:
        """A callable action sees the firing; a checkpointed runner restarted replays without calling it again."""
        from flowbus.rules import Publish, Rules

        client, feed = bus
        got: list[Any] = []
        ckpt = tmp_path / "rules.ckpt"

        def make() -> Rules:
            r = Rules(client, source="rules-test", checkpoint=ckpt)
            r.add("pair", when={"all": ["flowbus/feeder/state/a state=complete", "flowbus/feeder/state/b state=complete"]},
                  then=[got.append, Publish("log", key="pair", message="{rule}: {key}")])
            return r.start()

        rules = make()
        feed("a", "complete")
        poll("a latched", lambda: rules.status()["rules"]["pair"]["progress"] == "1/2 satisfied")
        rules.stop()
        rules = make()
        assert rules.status()["rules"]["pair"]["progress"] == "1/2 satisfied"
        with client.expect("flowbus/rules-test/log/pair", timeout=30) as w:
            feed("b", "complete")
        assert isinstance(w.event, LogLine) and w.event.message == "pair: b"
        rules.stop()
        rules = make()  # replays a and b from the journal: consumed already
        rules.stop()
        assert [[t.fields["key"] for t in f.triggers] for f in got] == [["a", "b"]]

    @pytest.mark.timeout(120)
    def test_first_start_catches_up_from_the_marks_it_is_given(
            self, bus: tuple[Client, Callable[[str, str], None]], tmp_path: Path) -> None:
        """``flowbus up`` takes the marks before it opens the sessions: an event published after
        them but before the orchestrator subscribed fires its rule once; older ones do not."""
        from flowbus.actors.rules import Catalog, OrchestratorCore, compile_rules
        from flowbus.schemas import RuleConfig

        client, feed = bus
        feed("old", "complete")
        since = {src: int(m[2]) for src, m in client.marks().items()}
        feed("early", "complete")  # between the marks and the orchestrator's start
        rules, rejected = compile_rules([RuleConfig(name="done", when="flowbus/feeder/state/* state=complete")],
                                        Catalog())
        assert not rejected
        core = OrchestratorCore(client.address, rules=rules, checkpoint=tmp_path / "c.ckpt", source="orch-since",
                                since=since)
        core.start()
        try:
            with client.expect("flowbus/orch-since/rule/done", timeout=30) as w:
                feed("late", "complete")
            fired = poll("two firings", lambda: (lambda evs: evs if len(evs) >= 2 else None)(  # noqa: PLC3002 - binds the fetched list once
                [e for e in journal(client, "flowbus/orch-since/rule/") if isinstance(e, RuleFired)]))
        finally:
            core.stop()
        assert isinstance(w.event, RuleFired)
        assert sorted(e.trigger_seq for e in fired) == [since["feeder"] + 1, since["feeder"] + 2]  # never "old"
        assert ["(key early)" in fired[0].detail, "(key late)" in fired[1].detail] == [True, True]

    @pytest.mark.timeout(120)
    def test_a_crash_while_actions_run_is_reported_not_repeated(
            self, bus: tuple[Client, Callable[[str, str], None]], tmp_path: Path) -> None:
        """The checkpoint taken before the actions lists the firing in flight; resuming from it
        publishes an ErrorEvent naming the firing and does not run its actions again."""
        import shutil
        import threading

        from flowbus.rules import Rules

        client, feed = bus
        entered, release = threading.Event(), threading.Event()
        calls: list[str] = []

        def slow(firing: Any) -> None:
            calls.append(firing.rule)
            entered.set()
            release.wait(30)

        first = Rules(client, source="rules-crash", checkpoint=tmp_path / "a.ckpt")
        first.add("slow", when="flowbus/feeder/state/go", then=slow)
        first.start()
        try:
            feed("go", "active")
            assert entered.wait(30)
            shutil.copy(tmp_path / "a.ckpt", tmp_path / "crashed.ckpt")  # the disk as a crash would leave it
        finally:
            release.set()
            first.stop()
        second = Rules(client, source="rules-crash", checkpoint=tmp_path / "crashed.ckpt")
        second.add("slow", when="flowbus/feeder/state/go", then=slow)
        with client.expect("flowbus/rules-crash/error/restart", timeout=30) as w:
            second.start()
        second.stop()
        assert isinstance(w.event, ErrorEvent) and "rule slow (slow|feeder:1)" in w.event.message
        assert calls == ["slow"]

    @pytest.mark.timeout(120)
    def test_composite_wait_counts_the_current_state(self, bus: tuple[Client, Callable[[str, str], None]]) -> None:
        """wait(all-of) is satisfied by one condition already true and one that happens after arming."""
        import threading

        from flowbus.rules import Rules

        client, feed = bus
        feed("x", "complete")
        rules = Rules(client)
        t = threading.Thread(target=feed, args=("y", "complete"))
        t.start()
        try:
            firing = rules.wait({"all": ["flowbus/feeder/state/x state=complete",
                                         "flowbus/feeder/state/y state=complete"]}, timeout=30)
        finally:
            t.join(10)
        assert sorted(t.fields["key"] for t in firing.triggers) == ["x", "y"]
        with pytest.raises(WaitTimeout):
            rules.wait("flowbus/feeder/state/never", timeout=0.5)

    @pytest.mark.timeout(120)
    def test_bad_rule_raises_and_a_failing_callback_is_an_error_event(
            self, bus: tuple[Client, Callable[[str, str], None]]) -> None:
        """A bad rule is refused with its name; a callback that raises becomes an ErrorEvent, the runner goes on."""
        from flowbus.rules import Rules

        client, feed = bus
        with Rules(client, source="rules-err") as rules:
            with pytest.raises(ConfigError, match=r"rule 'oops': .*unknown backend 'nosuch'"):
                rules.add("oops", when="nosuch/x/state/y")

            def boom(_firing: Any) -> None:
                raise ValueError("callback exploded")

            rules.add("boom", when="flowbus/feeder/state/go", then=boom)
            with client.expect("flowbus/rules-err/error/boom", timeout=30) as w:
                feed("go", "active")
            assert isinstance(w.event, ErrorEvent) and "callback exploded" in w.event.message
            assert w.event.error_type == "builtins.ValueError"
            with client.expect("flowbus/rules-err/rule/boom", timeout=30):
                feed("go", "active")
