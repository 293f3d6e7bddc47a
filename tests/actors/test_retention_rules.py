"""Retention and the rules: a rule that fired on a resource is not affected when its session
forgets it, and the orchestrator's per-resource state (policy attempts, give-ups, QCG specs)
goes with the resource, so the checkpoint stays bounded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from flowbus.actors.rules import Catalog, Policy, compile_policy
from flowbus.actors.rules._core import MAX_SPECS
from flowbus.schemas import Forgotten, PolicyConfig, State, StateChanged
from support import poll
from support.bus import BusFactory, bus_fixture  # noqa: F401 - provides `bus`

pytestmark = pytest.mark.timeout(60)
CATALOG = Catalog({"s": "qcg"}, {"s": ["submit", "remove", "resubmit"]}.get)


def _policy(**kw: Any) -> Policy:
    return compile_policy(msgspec.convert({"name": "p", "match": "qcg/*/state/*", **kw}, PolicyConfig), CATALOG)


def _until(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Bounded polling of state no event reports (a callback's list)."""
    return poll.until(check, timeout, what, every=0.02)


class TestPolicyForget:
    def test_forget_drops_a_given_up_resource(self) -> None:
        p = _policy(**{"max-attempts": 0})
        ev = StateChanged(source="s", backend="qcg", key="j", state=State.ABORTED, seq=1)
        (gave_up,) = p.feed(ev, 0.0)
        assert gave_up.kind == "gave-up" and p.size() == 1
        assert p.forget("s", "j") is False
        assert p.size() == 0

    def test_a_due_retry_survives_forgetting(self) -> None:
        p = _policy(**{"max-attempts": 2, "backoff": 5.0})
        p.feed(StateChanged(source="s", backend="qcg", key="j", state=State.ABORTED, seq=1), 0.0)
        assert p.forget("s", "j") is True
        assert [r.kind for r in p.tick(10.0)] == ["retry"]


class TestOrchestrator:
    def test_rule_that_fired_is_unaffected_and_state_is_dropped(self, bus: BusFactory, tmp_path: Path) -> None:
        from flowbus.rules import Rules

        tb = bus.broker()
        pub = bus.source(tb.address, "s")
        client = bus.client(tb.address)
        got: list[str] = []
        rules = Rules(client, source="retention-rules", checkpoint=tmp_path / "r.ckpt")
        rules.add("done", when="qcg/s/state/* state=complete", then=lambda f: got.append(f.triggers[-1].fields["key"]))
        rules.policy("p", "qcg/s/state/*", **{"max-attempts": 0})
        rules.start()
        try:
            core = rules._core  # the OrchestratorCore the runner drives
            assert core is not None
            with core.lock:
                core.specs["s"] = {"a": {"name": "a"}, "x": {"name": "x"}}
            pub.publish(StateChanged(source="s", backend="qcg", key="a", state=State.COMPLETE))
            pub.publish(StateChanged(source="s", backend="qcg", key="x", state=State.ABORTED))
            pub.flush(5)
            _until("a fired", lambda: got == ["a"])
            _until("x given up", lambda: rules.status()["policies"]["p"]["gave-up"] == 1)
            pub.publish(Forgotten(source="s", backend="qcg", key="a", last_state=State.COMPLETE))
            pub.publish(Forgotten(source="s", backend="qcg", key="x", last_state=State.ABORTED))
            pub.publish(StateChanged(source="s", backend="qcg", key="b", state=State.COMPLETE))
            pub.flush(5)
            _until("b fired", lambda: got == ["a", "b"])
            status = _until("both forgotten", lambda: (st := rules.status())["stats"].get("forgotten") == 2 and st)
            assert status["stats"]["errors"] == 0
            assert status["policies"]["p"]["gave-up"] == 0
            assert status["limits"]["specs"] == {"limit_per_session": MAX_SPECS, "used": 0}
        finally:
            rules.stop()
        assert got == ["a", "b"], "forgetting a resource fires nothing and undoes nothing"
