"""The sans-I/O rule engine and recovery policies: conditions, actions, idempotency, checkpoints."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest

from flowbus.actors.rules import (
    CallSpec,
    Catalog,
    Engine,
    Firing,
    Policy,
    PublishSpec,
    Recovery,
    Rule,
    build_actions,
    build_node,
    compile_policies,
    compile_policy,
    compile_rules,
    dumps,
    loads,
    recovery_calls,
    render,
    substitute,
)
from flowbus.schemas import (
    AttributeChanged,
    ConfigError,
    Connected,
    Disconnected,
    LogLine,
    PolicyConfig,
    RuleConfig,
    State,
    StateChanged,
    parse_config,
)

T0 = 1_700_000_000.0
SESSIONS = {"local": "qcg", "ops": "ecflow", "difx": "guiserver", "wf": "soma", "bps": "wms"}
OPS = {"local": ["submit", "remove", "cancel", "status"], "ops": ["requeue", "kill", "resume"],
       "difx": ["start_job", "stop_job"], "wf": ["restart_workflow", "stop_workflow"], "bps": ["restart", "cancel"]}
CATALOG = Catalog(SESSIONS, OPS.get)


class Stream:
    """Events with per-source gapless seqs and an explicit clock (seconds after T0)."""

    def __init__(self) -> None:
        self.seqs: dict[str, itertools.count[int]] = {}

    def state(self, source: str, key: str, state: str, at: float, backend: str = "qcg", **kw: Any) -> StateChanged:
        return StateChanged(source=source, backend=backend, key=key, state=State(state), time=int((T0 + at) * 1e9),
                            seq=self._seq(source), **kw)

    def log(self, source: str, key: str, at: float, level: str = "info", backend: str = "guiserver") -> LogLine:
        return LogLine(source=source, backend=backend, key=key, level=level, message="m", time=int((T0 + at) * 1e9),
                       seq=self._seq(source))

    def attr(self, source: str, key: str, at: float, backend: str = "guiserver") -> AttributeChanged:
        return AttributeChanged(source=source, backend=backend, key=key, kind="progress", name="pct", value=1,
                                time=int((T0 + at) * 1e9), seq=self._seq(source))

    def _seq(self, source: str) -> int:
        return next(self.seqs.setdefault(source, itertools.count(1)))


def engine(**rules: Any) -> Engine:
    return Engine([Rule(name, build_node(when, CATALOG), []) for name, when in rules.items()])


def fired(firings: list[Firing]) -> list[tuple[str, list[int]]]:
    return [(f.rule, [t.seq for t in f.triggers]) for f in firings]


class TestConditions:
    def test_match_fires_per_matching_event(self) -> None:
        """A match condition fires once for every matching event and never for others."""
        s, e = Stream(), engine(r="qcg/local/state/a state=complete")
        assert fired(e.feed(s.state("local", "a", "active", 1))) == []
        assert fired(e.feed(s.state("local", "a", "complete", 2))) == [("r", [2])]
        assert fired(e.feed(s.state("local", "b", "complete", 3))) == []

    def test_all_of_in_any_order_then_resets(self) -> None:
        """all-of fires when every child was satisfied, whatever the order, and starts over after."""
        s, e = Stream(), engine(r={"all": ["qcg/local/state/a state=complete", "ecflow/ops/state//s/t state=complete"]})
        assert e.feed(s.state("ops", "/s/t", "complete", 1, backend="ecflow")) == []
        out = e.feed(s.state("local", "a", "complete", 2))
        assert [(t.source, t.seq) for t in out[0].triggers] == [("local", 1), ("ops", 1)]
        assert e.feed(s.state("local", "a", "complete", 3)) == []  # reset: needs /s/t again

    def test_any_of(self) -> None:
        """any-of fires for each child that is satisfied."""
        s, e = Stream(), engine(r={"any": ["qcg/local/state/a", "qcg/local/state/b"]})
        assert len(e.feed(s.state("local", "a", "active", 1))) == 1
        assert len(e.feed(s.state("local", "b", "active", 2))) == 1
        assert e.feed(s.state("local", "c", "active", 3)) == []

    def test_sequence_requires_order(self) -> None:
        """A sequence ignores a later step that comes first and fires once the steps come in order."""
        s, e = Stream(), engine(r={"sequence": ["qcg/local/state/a", "qcg/local/state/b"]})
        assert e.feed(s.state("local", "b", "active", 1)) == []
        assert e.feed(s.state("local", "a", "active", 2)) == []
        assert fired(e.feed(s.state("local", "b", "active", 3))) == [("r", [2, 3])]

    def test_count_within_window(self) -> None:
        """count fires at n matches inside the sliding window; older matches fall out of it."""
        s, e = Stream(), engine(r={"count": "qcg/local/state/* state=aborted", "n": 3, "within": 10})
        assert e.feed(s.state("local", "a", "aborted", 0)) == []
        assert e.feed(s.state("local", "b", "aborted", 5)) == []
        assert e.feed(s.state("local", "c", "aborted", 12)) == []  # the first one is out of the window
        assert fired(e.feed(s.state("local", "d", "aborted", 13))) == [("r", [2, 3, 4])]

    def test_absence_fires_on_tick_when_nothing_follows(self) -> None:
        """absent: no matching event within T after the start event fires at the deadline, not before."""
        s = Stream()
        e = engine(r={"absent": "guiserver/difx/*", "after": "guiserver/difx/state/* state=active", "within": 600})
        e.feed(s.state("difx", "j1", "active", 0, backend="guiserver"))
        assert e.deadline() == pytest.approx(T0 + 600)
        assert e.tick(T0 + 599) == []
        out = e.tick(T0 + 600)
        assert [f.event["key"] for f in out] == ["j1"]
        assert e.tick(T0 + 2000) == []  # once

    def test_absence_cancelled_and_restarted_per_key(self) -> None:
        """A progress event of the same key cancels; one of another key does not; matching both restarts."""
        s = Stream()
        e = engine(r={"absent": "guiserver/difx/attr/*", "after": {"any": ["guiserver/difx/state/* state=active",
                                                                          "guiserver/difx/attr/*"]}, "within": 10})
        e.feed(s.state("difx", "j1", "active", 0, backend="guiserver"))
        e.feed(s.state("difx", "j2", "active", 0, backend="guiserver"))
        e.feed(s.attr("difx", "j1", 8))  # j1 progress: j1 restarts at 8, j2 untouched
        out = e.tick(T0 + 10)
        assert [f.event["key"] for f in out] == ["j2"]
        assert [f.event["key"] for f in e.tick(T0 + 18)] == ["j1"]

    def test_absence_fires_before_a_later_replayed_event(self) -> None:
        """Feeding an event first runs timers that expired before it (replay gives the same answer)."""
        s = Stream()
        e = engine(r={"absent": "qcg/local/state/a state=complete", "after": "qcg/local/state/a state=active",
                      "within": 10})
        e.feed(s.state("local", "a", "active", 0))
        out = e.feed(s.state("local", "a", "complete", 20))
        assert fired(out) == [("r", [1])]

    def test_nested(self) -> None:
        """Conditions nest: all-of a count and a sequence."""
        s = Stream()
        e = engine(r={"all": [{"count": "qcg/local/state/x:* state=complete", "n": 2},
                              {"sequence": ["ecflow/ops/state//a", "ecflow/ops/state//b"]}]})
        e.feed(s.state("local", "x:0", "complete", 1))
        e.feed(s.state("ops", "/a", "active", 2, backend="ecflow"))
        e.feed(s.state("ops", "/b", "active", 3, backend="ecflow"))
        assert fired(e.feed(s.state("local", "x:1", "complete", 4))) == [("r", [1, 2, 1, 2])]


class TestIdempotencyAndCheckpoint:
    def test_replayed_events_are_ignored(self) -> None:
        """The same (source, seq) fed again, or an older one, never fires again."""
        s, e = Stream(), engine(r="qcg/local/state/* state=complete")
        evs = [s.state("local", f"j{i}", "complete", i) for i in range(3)]
        assert len([f for ev in evs for f in e.feed(ev)]) == 3
        assert [f for ev in evs for f in e.feed(ev)] == []

    def test_half_satisfied_all_of_survives_restore(self) -> None:
        """A half-satisfied all-of restored from a checkpoint fires once, with replays ignored."""
        s = Stream()
        when = {"all": ["qcg/local/state/a state=complete", "qcg/local/state/b state=complete"]}
        e1 = engine(r=when)
        first = s.state("local", "a", "complete", 1)
        e1.feed(first)
        data = loads(dumps(e1.dump()))
        e2 = engine(r=when)
        e2.rules["r"].fingerprint = e1.rules["r"].fingerprint = "same"
        assert e2.load({**data, "rules": {"r": {**data["rules"]["r"], "fp": "same"}}}) == ["r"]
        assert e2.rules["r"].node.progress() == "1/2 satisfied"
        assert e2.feed(first) == []  # a replay of what was consumed
        assert fired(e2.feed(s.state("local", "b", "complete", 2))) == [("r", [1, 2])]

    def test_pending_absence_timer_survives_restore(self) -> None:
        """A pending absence timer restored from a checkpoint fires at its original deadline."""
        s = Stream()
        cfg = RuleConfig(name="r", when={"absent": "qcg/local/state/a state=complete",  # type: ignore[arg-type]  # a plain dict, as TOML gives
                                         "after": "qcg/local/state/a state=active", "within": 30})
        cfg = msgspec.convert(msgspec.to_builtins(cfg), RuleConfig)
        rules1, _ = compile_rules([cfg], CATALOG)
        e1 = Engine(rules1)
        e1.feed(s.state("local", "a", "active", 0))
        raw = dumps(e1.dump())
        rules2, _ = compile_rules([cfg], CATALOG)
        e2 = Engine(rules2)
        assert e2.load(loads(raw)) == ["r"]
        assert e2.tick(T0 + 29) == []
        assert len(e2.tick(T0 + 30)) == 1

    def test_changed_rule_starts_fresh(self) -> None:
        """Progress of a rule whose definition changed is not restored."""
        a = RuleConfig(name="r", when="qcg/local/state/a")
        b = RuleConfig(name="r", when="qcg/local/state/b")
        e1 = Engine(compile_rules([a], CATALOG)[0])
        e1.feed(Stream().state("local", "a", "active", 0))
        e2 = Engine(compile_rules([b], CATALOG)[0])
        assert e2.load(loads(dumps(e1.dump()))) == []


class TestReplayOrder:
    def test_merge_by_time_keeps_each_source_in_seq_order(self) -> None:
        """Replayed sources interleave by time, but a source whose clock stepped back keeps its seq order."""
        from flowbus.actors.rules import merge_by_time

        s = Stream()
        a1, a2 = s.state("local", "a", "active", 5), s.state("local", "a", "complete", 1)  # clock stepped back
        b1 = s.state("ops", "/t", "active", 3, backend="ecflow")
        out = merge_by_time([a1, a2, b1])
        assert [(e.source, e.seq) for e in out if e.source == "local"] == [("local", 1), ("local", 2)]
        assert out.index(b1) == 0


class TestActions:
    def test_call_substitution_keeps_types(self) -> None:
        """{field} references are filled from the triggering event; a whole-string reference keeps its type."""
        s, e = Stream(), Engine([Rule("r", build_node("qcg/local/state/*", CATALOG), build_actions(
            [{"call": {"session": "local", "operation": "submit",
                       "args": [[{"name": "after-{key}", "args": ["{seq}", "${it}"], "n": "{seq}"}]]}}], CATALOG))])
        (f,) = e.feed(s.state("local", "a", "complete", 0, attrs={"input": "/d/x.input"}))
        call = render(e.rules["r"].actions[0], f)
        assert isinstance(call, CallSpec)
        assert call.args == [[{"name": "after-a", "args": [1, "${it}"], "n": 1}]]
        assert substitute("{attrs.input} {rule} {nope}", {"attrs": {"input": "/d/x.input"}, "rule": "r"}) == "/d/x.input r {nope}"

    def test_publish_and_callback_actions(self) -> None:
        """publish builds an event spec with the trigger's key by default; callables are kept as they are."""
        seen: list[Firing] = []
        acts = build_actions([{"publish": {"type": "log", "level": "alert", "message": "{key} is {state}"}}, seen.append],
                             CATALOG)
        s, e = Stream(), Engine([Rule("r", build_node("qcg/local/state/*", CATALOG), acts)])
        (f,) = e.feed(s.state("local", "a", "aborted", 0))
        pub = render(acts[0], f)
        assert pub == PublishSpec(type="log", fields={"level": "alert", "message": "a is aborted", "key": "a"})
        render(acts[1], f)(f)  # type: ignore[operator]  # a FiringCallback action here
        assert seen == [f]


class TestBadRules:
    @pytest.mark.parametrize(("when", "then", "problem"), [
        ("nobackend/local/state/a", [], "unknown backend 'nobackend'"),
        ("qcg/nosuch/state/a", [], "unknown qcg session 'nosuch'"),
        ("qcg/local/state/a state", [], "invalid match expression"),
        ({"count": "qcg/local/state/a", "n": 0}, [], "n must be >= 1"),
        ({"absent": "qcg/local/state/a"}, [], "needs after"),
        ({"all": []}, [], "needs at least one"),
        ({"all": ["qcg/*"], "any": ["qcg/*"]}, [], "exactly one of"),
        ("qcg/local/state/a", [{"call": {"session": "nosuch", "operation": "submit"}}], "unknown session 'nosuch'"),
        ("qcg/local/state/a", [{"call": {"session": "local", "operation": "explode"}}], "no operation 'explode'"),
        ("qcg/local/state/a", [{"publish": {"type": "nosuch"}}], "unknown event type 'nosuch'"),
        ("qcg/local/state/a", [{"publish": {"type": "log", "colour": "red"}}], "no field 'colour'"),
    ])
    def test_rejected_by_name_others_kept(self, when: Any, then: Any, problem: str) -> None:
        """A bad rule is rejected with its name and the problem; the good rule beside it compiles."""
        cfgs = msgspec.convert([{"name": "bad", "when": when, "then": then},
                                {"name": "good", "when": "qcg/local/state/a"}], list[RuleConfig])
        rules, rejected = compile_rules(cfgs, CATALOG)
        assert [r.name for r in rules] == ["good"]
        assert problem in rejected["bad"] and rejected["bad"].startswith("rule 'bad':")

    def test_config_file_shape(self) -> None:
        """The TOML shape loads; duplicate names and unknown keys are config errors naming them."""
        cfg = parse_config({"sessions": [{"backend": "qcg", "name": "local"}],
                            "rules": [{"name": "a", "when": {"count": "qcg/*", "n": 2, "within": 5},
                                       "then": [{"call": {"session": "local", "operation": "list"}}]}],
                            "policies": [{"name": "p", "match": "qcg/*/state/*", "max-attempts": 2}]})
        assert cfg.rules[0].name == "a" and cfg.policies[0].max_attempts == 2
        with pytest.raises(ConfigError, match="duplicate name 'a'"):
            parse_config({"rules": [{"name": "a", "when": "qcg/*"}, {"name": "a", "when": "qcg/*"}]})
        with pytest.raises(ConfigError, match=r"rules\[0\] \('a'\): unknown key 'then\[0\].cal'"):
            parse_config({"rules": [{"name": "a", "when": "qcg/*", "then": [{"cal": {}}]}]})

    def test_bad_policies_rejected(self) -> None:
        """Policies naming unknown backends, sessions or states are rejected by name."""
        cfgs = msgspec.convert([{"name": "p1", "match": "nosuch/*/state/*"}, {"name": "p2", "match": "qcg/x/state/*"},
                                {"name": "p3", "match": "qcg/*/state/*", "on": ["broken"]},
                                {"name": "ok", "match": "qcg/*/state/*"}], list[PolicyConfig])
        pols, rejected = compile_policies(cfgs, CATALOG)
        assert [p.name for p in pols] == ["ok"]
        assert "unknown backend" in rejected["p1"] and "unknown qcg session 'x'" in rejected["p2"]
        assert "unknown state 'broken'" in rejected["p3"]


def policy(**kw: Any) -> Policy:
    return compile_policy(msgspec.convert({"name": "p", "match": "qcg/*/state/*", **kw}, PolicyConfig), CATALOG)


class TestPolicies:
    def test_retry_with_backoff_then_give_up(self) -> None:
        """aborted -> retries after 1, 2 s (doubling), then a give-up; attempts count across aborts."""
        s, p = Stream(), policy(**{"max-attempts": 2, "backoff": 1.0})
        assert p.feed(s.state("local", "j", "aborted", 0), T0) == []
        assert p.tick(T0 + 0.9) == []
        (r1,) = p.tick(T0 + 1.0)
        assert (r1.kind, r1.attempt, r1.key) == ("retry", 1, "j")
        p.feed(s.state("local", "j", "queued", 2), T0 + 2)
        p.feed(s.state("local", "j", "aborted", 3), T0 + 3)
        assert p.tick(T0 + 4.9) == []
        (r2,) = p.tick(T0 + 5.0)
        assert r2.attempt == 2
        (g,) = p.feed(s.state("local", "j", "aborted", 6), T0 + 6)
        assert (g.kind, g.attempt) == ("gave-up", 2)
        assert p.feed(s.state("local", "j", "aborted", 7), T0 + 7) == []  # once

    def test_complete_resets_and_iterations_skipped(self) -> None:
        """complete resets the attempt count; QCG iterations are retried through their job only."""
        s, p = Stream(), policy(**{"max-attempts": 1, "backoff": 0})
        p.feed(s.state("local", "j", "aborted", 0), T0)
        assert len(p.tick(T0)) == 1
        p.feed(s.state("local", "j", "complete", 1), T0 + 1)
        p.feed(s.state("local", "j", "aborted", 2), T0 + 2)
        assert [r.kind for r in p.tick(T0 + 2)] == ["retry"]
        assert p.feed(s.state("local", "j:3", "aborted", 3), T0 + 3) == []
        w = policy(match="wms/*/state/*", backoff=0)
        w.feed(s.state("bps", "/s/w/j1", "aborted", 4, backend="wms", attrs={"kind": "job", "wms_id": "/s/w"}), T0 + 4)
        w.feed(s.state("bps", "/s/w", "aborted", 5, backend="wms", attrs={"kind": "workflow", "wms_id": "/s/w"}), T0 + 5)
        assert [r.key for r in w.tick(T0 + 5)] == ["/s/w"]

    def test_failed_attempt_schedules_next(self) -> None:
        """A retry whose calls failed schedules the next attempt, then gives up."""
        s, p = Stream(), policy(**{"max-attempts": 2, "backoff": 1})
        p.feed(s.state("local", "j", "aborted", 0), T0)
        (r1,) = p.tick(T0 + 1)
        assert p.failed(r1, T0 + 1, "boom") == []
        (r2,) = p.tick(T0 + 3)
        assert r2.attempt == 2
        (g,) = p.failed(r2, T0 + 3, "boom")
        assert g.kind == "gave-up" and "boom" in g.reason

    def test_stalled_alert_and_progress(self) -> None:
        """active with no event for T -> alert; an event for the key restarts the clock."""
        s, p = Stream(), policy(match="guiserver/*/state/*", **{"stalled-after": 10})
        p.feed(s.state("difx", "j", "active", 0, backend="guiserver"), T0)
        p.feed(s.log("difx", "j", 8), T0 + 8)
        assert p.tick(T0 + 17) == []
        (a,) = p.tick(T0 + 18)
        assert a.kind == "alert" and "no event for 10 s" in a.reason

    def test_kill_retry_and_give_up_after_disconnect(self) -> None:
        """kill-retry counts as an attempt and ignores the abort it causes; a session down for T gives up."""
        s, p = Stream(), policy(**{"stalled-after": 5, "on-stalled": "kill-retry", "give-up-after": 30})
        p.feed(s.state("local", "j", "active", 0), T0)
        (k,) = p.tick(T0 + 5)
        assert (k.kind, k.attempt) == ("kill-retry", 1)
        assert p.feed(s.state("local", "j", "aborted", 6), T0 + 6) == [] and p.tick(T0 + 100) == []
        p.feed(Disconnected(source="local", backend="qcg", seq=next(s.seqs["local"])), T0 + 10)
        p.feed(Connected(source="local", backend="qcg", seq=next(s.seqs["local"])), T0 + 20)
        assert p.tick(T0 + 50) == []
        p.feed(Disconnected(source="local", backend="qcg", seq=next(s.seqs["local"])), T0 + 60)
        (g,) = p.tick(T0 + 90)
        assert (g.kind, g.source, g.key) == ("gave-up", "local", "")

    def test_checkpoint_round_trip(self) -> None:
        """A due retry and the attempt count survive dump/load; replays are ignored after it."""
        s, p1 = Stream(), policy(**{"max-attempts": 3, "backoff": 4})
        ev = s.state("local", "j", "aborted", 0)
        p1.feed(ev, T0)
        p2 = policy(**{"max-attempts": 3, "backoff": 4})
        assert p2.load(loads(dumps(p1.dump())))
        assert p2.feed(ev, T0) == []
        (r,) = p2.tick(T0 + 4)
        assert r.attempt == 1

    @pytest.mark.parametrize(("backend", "key", "fields", "ops"), [
        ("ecflow", "/s/t", {}, [("requeue", ["/s/t"])]),
        ("qcg", "j", {}, [("remove", [["j"]]), ("submit", [[{"name": "j", "exec": "/bin/true"}]])]),
        ("soma", "12", {}, [("restart_workflow", [12])]),
        ("wms", "/sub/w-1", {"attrs": {"kind": "workflow", "wms_id": "/sub/w-1"}}, [("restart", ["/sub/w-1"])]),
        ("guiserver", "e_1", {"state": "aborted", "attrs": {"input": "/d/e_1.input"}}, [("start_job", ["/d/e_1.input"])]),
        ("guiserver", "e_1", {"state": "active", "attrs": {"input": "/d/e_1.input"}},
         [("stop_job", ["e_1"]), ("start_job", ["/d/e_1.input"])]),
    ])
    def test_recovery_calls_per_backend(self, backend: str, key: str, fields: dict[str, Any],
                                        ops: list[tuple[str, list[Any]]]) -> None:
        """Each backend's own retry operation, with its arguments."""
        rec = Recovery(policy="p", kind="retry", source="s", backend=backend, key=key, attempt=1, fields=fields)
        calls = recovery_calls(rec, lambda _s, j: {"name": j, "exec": "/bin/true"})
        assert [(c.operation, c.args) for c in calls] == ops
        if backend == "guiserver":
            assert calls[-1].kwargs == {"force": True}

    def test_qcg_retry_without_spec_uses_the_sessions_resubmit(self) -> None:
        """A QCG job the orchestrator has no spec of is retried by the session's own resubmit
        (after cancel for a kill-retry)."""
        rec = Recovery(policy="p", kind="retry", source="local", backend="qcg", key="j", attempt=1)
        calls = recovery_calls(rec, lambda _s, _j: None)
        assert [(c.session, c.operation, c.args) for c in calls] == [("local", "resubmit", ["j"])]
        kill = msgspec.structs.replace(rec, kind="kill-retry")
        calls = recovery_calls(kill, lambda _s, _j: None)
        assert [(c.operation, c.args) for c in calls] == [("cancel", [["j"]]), ("resubmit", ["j"])]


class TestReadme:
    def test_the_readme_example_loads_with_every_rule_accepted(self) -> None:
        """The TOML of docs/orchestration.md parses and every rule and policy compiles against the
        real sessions' operations."""
        import re
        import tomllib
        from pathlib import Path

        from flowbus.actors.rules import catalog_for

        section = (Path(__file__).resolve().parents[2] / "docs" / "orchestration.md").read_text()
        block = re.search(r"```toml\n(.*?)```", section, re.S)
        assert block is not None
        sessions = [{"backend": "ecflow", "name": "ops"}, {"backend": "qcg", "name": "local"},
                    {"backend": "soma", "name": "soma"}, {"backend": "guiserver", "name": "difx"}]
        cfg = parse_config({**tomllib.loads(block.group(1)), "sessions": sessions})
        catalog = catalog_for(cfg)
        rules, rejected = compile_rules(cfg.rules, catalog)
        policies, bad = compile_policies(cfg.policies, catalog)
        assert (rejected, bad) == ({}, {})
        assert len(rules) == len(cfg.rules) >= 4 and len(policies) == len(cfg.policies) >= 1
