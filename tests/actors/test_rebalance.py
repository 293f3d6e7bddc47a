"""Rebalancing (issue 14, item 2): the pure move planner (``_placement.rebalance_moves``), and a
session handed over between two BackendActorImpls (the body of the Ray actor, in this process)
with a real broker and a real QCG-PilotJob manager: never while a command runs, no seq gap and
no duplicate on the bus, the new incarnation adopts the same manager. The 3-node
cluster run (node killed, sessions move; node back, they return) is in test_cluster.py."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from flowbus.actors._placement import rebalance_moves
from flowbus.schemas import (
    BackendUnavailable,
    Connected,
    Event,
    FlowbusConfig,
    PlacementConfig,
    QcgSessionConfig,
    RayConfig,
)
from support import poll

G2 = {"a": "g", "b": "g"}


class TestRebalanceMoves:
    def test_sessions_go_home_when_home_returns(self) -> None:
        """After a node death all of a group sat on b; a is back: its sessions go home, b keeps its own."""
        home = {"s1": "a", "s2": "b", "s3": "a"}
        placement = {"s1": "b", "s2": "b", "s3": "b"}
        assert rebalance_moves(home, placement, G2, {"a", "b"}, 10) == [("s1", "b", "a"), ("s3", "b", "a")]

    def test_limit_bounds_the_moves_of_one_turn(self) -> None:
        home = {"s1": "a", "s2": "b", "s3": "a"}
        placement = {"s1": "b", "s2": "b", "s3": "b"}
        assert rebalance_moves(home, placement, G2, {"a", "b"}, 1) == [("s1", "b", "a")]
        assert rebalance_moves(home, placement, G2, {"a", "b"}, 0) == []

    def test_nothing_moves_to_or_from_an_actor_that_is_not_ready(self) -> None:
        """Home still gone (or failing): the sessions stay where they were moved."""
        home = {"s1": "a", "s2": "b"}
        placement = {"s1": "b", "s2": "b"}
        assert rebalance_moves(home, placement, G2, {"b"}, 10) == []
        assert rebalance_moves(home, {"s1": "c", "s2": "b"}, {**G2, "c": "g"}, {"a", "b"}, 10) == []

    def test_balanced_placement_moves_nothing(self) -> None:
        home = {"s1": "a", "s2": "b", "s3": "a"}
        assert rebalance_moves(home, dict(home), G2, {"a", "b"}, 10) == []
        # away from home, but home is not less loaded: no move (no ping-pong)
        assert rebalance_moves({"s1": "a", "s2": "a"}, {"s1": "a", "s2": "b"}, G2, {"a", "b"}, 10) == []

    def test_new_actor_without_home_sessions_is_filled_until_balanced(self) -> None:
        """Sessions whose home is not ready spread from the most to the least loaded actor."""
        groups = {"a": "g", "b": "g", "c": "g"}
        home = {f"s{i}": "x" for i in range(6)}
        placement = {f"s{i}": "a" for i in range(6)}
        moves = rebalance_moves(home, placement, groups, {"a", "b", "c"}, 10)
        assert len(moves) == 4 and all(frm == "a" for _, frm, _ in moves)
        after = dict(placement) | {s: to for s, _, to in moves}
        loads = sorted(sum(1 for a in after.values() if a == x) for x in "abc")
        assert loads == [2, 2, 2]

    def test_moves_stay_within_a_group(self) -> None:
        groups = {"a": "g", "b": "h"}
        assert rebalance_moves({"s1": "a", "s2": "a"}, {"s1": "b", "s2": "b"}, groups, {"a", "b"}, 10) == []


def _qcg_service(wd: str) -> psutil.Process:
    found = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
             and "qcg._service" in " ".join(p.info["cmdline"] or []) and wd in " ".join(p.info["cmdline"] or [])]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.qcg
class TestHandOver:
    @pytest.mark.timeout(180)
    def test_hand_over_waits_for_commands_and_loses_nothing(self, broker_factory: Any, tmp_path: Path) -> None:
        """Session q on actor a, its QCG manager frozen with a command in flight: hand_over
        refuses (the command still runs); a second hand_over waits, and meanwhile new commands
        are refused. Thawed: the command ends, the hand-over completes; actor b opens q under a
        new incarnation and adopts the same manager, whose job submitted before the move is
        still known; per source the seqs have no gap and no duplicate."""
        from flowbus.actors import _backend_actor as ba
        from flowbus.bus import Subscriber

        broker = broker_factory()
        wd = str(tmp_path / "qcg")
        spec = msgspec.to_builtins(QcgSessionConfig(name="q", wd=wd, recovery="none", request_timeout=10.0,
                                                    liveness_interval=0))
        loop = asyncio.new_event_loop()
        a = ba.BackendActorImpl("a", broker.address, [spec], poll_workers=2)
        b = ba.BackendActorImpl("b", broker.address, [], poll_workers=2)
        frozen: psutil.Process | None = None
        try:
            assert loop.run_until_complete(asyncio.wait_for(a.start(), 90))["sessions"] == ["q"]
            loop.run_until_complete(asyncio.wait_for(b.start(), 60))
            loop.run_until_complete(asyncio.wait_for(
                a.call("q", "submit", [{"name": "before", "exec": "/bin/true"}]), 30))
            frozen = _qcg_service(wd)
            frozen.suspend()

            async def while_frozen() -> list[Any]:
                call = asyncio.ensure_future(a.call("q", "list"))
                await poll.until_async(lambda: bool(a._inflight.get("q")), 10, "the command to be in flight", every=0.01)
                with pytest.raises(BackendUnavailable, match="still runs"):
                    await a.hand_over("q", wait=0.5)
                assert "q" in (await a.ping())["sessions"]  # refused: still here
                handing = asyncio.ensure_future(a.hand_over("q", wait=60))
                await poll.until_async(lambda: "q" in a._handing, 10, "the hand-over to start", every=0.01)
                with pytest.raises(BackendUnavailable, match="handed over"):
                    await a.call("q", "list")
                assert not handing.done()  # waits for the command
                assert frozen is not None
                frozen.resume()
                return list(await asyncio.gather(call, handing, return_exceptions=True))

            listed, handed = loop.run_until_complete(asyncio.wait_for(while_frozen(), 90))
            frozen = None
            assert not isinstance(listed, BaseException), listed  # the command ran to its end
            assert isinstance(handed, dict) and handed["sessions"] == [], handed
            info = loop.run_until_complete(asyncio.wait_for(b.add_session(spec), 90))
            assert info["sessions"] == ["q"]
            known = loop.run_until_complete(asyncio.wait_for(b.call("q", "list"), 30))
            assert "before" in str(known), known  # the same manager, adopted

            sub = Subscriber(broker.address, "qcg/", start="journal")
            events: list[Event] = []
            try:
                sub.sync()
                events += sub.recv_many(1.0)
            finally:
                sub.close()
            mine = [e for e in events if e.source == "q"]
            seqs = [e.seq for e in mine]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # no gap, no duplicate
            incs = [e.incarnation for e in mine]
            assert incs == sorted(incs) and len(set(incs)) == 2, incs
            connected = [e for e in mine if isinstance(e, Connected)]
            assert len(connected) == 2 and connected[0].address == connected[1].address, connected
        finally:
            if frozen is not None:
                frozen.resume()
            try:
                for impl in (a, b):
                    loop.run_until_complete(asyncio.wait_for(impl.stop(), 60))
            finally:
                for impl in (a, b):
                    impl._pool.shutdown(wait=True)
                loop.close()


@pytest.mark.ray
@pytest.mark.qcg
class TestSupervisorRebalance:
    @pytest.mark.timeout(300)
    def test_dead_actor_is_created_again_and_its_session_returns(
            self, ray_local: str, broker_factory: Any, tmp_path: Path) -> None:
        """Group rb: two actors, one QCG session each, on the local Ray. rb-0 is killed for good:
        r1 moves to rb-1; rb-0 is retired, created again (there is room for it) and r1 moves back,
        recorded with reason ``rebalance``. Commands sent through the Supervisor all along the
        return never fail because of the move (they wait for it, or are sent again after it)."""
        import ray
        from ray.exceptions import RayTaskError

        from flowbus.actors import ACTOR_PREFIX, Supervisor

        broker = broker_factory()
        cfg = FlowbusConfig(
            ray=RayConfig(namespace="flowbus-test", move_after=2.0, rebalance_per_second=5.0,
                          placement=[PlacementConfig(name="rb", backends=["qcg"], actors=2)]),
            sessions=[QcgSessionConfig(name=n, wd=str(tmp_path / n)) for n in ("r1", "r2")])
        sup = Supervisor.remote(msgspec.json.encode(cfg), broker.address)

        def where(session: str) -> str:
            return str(ray.get(sup.sessions.remote(), timeout=20)[session])

        def until(cond: Callable[[], bool], within: float, what: str) -> None:
            poll.until(cond, within, what, every=0.2)

        try:
            assert ray.get(sup.start.remote(), timeout=120) == {"r1": "rb-0", "r2": "rb-1"}
            ray.kill(ray.get_actor(ACTOR_PREFIX + "rb-0"), no_restart=True)
            until(lambda: where("r1") == "rb-1", 90, "r1 moved to rb-1")
            outcomes: list[str] = []
            deadline = time.monotonic() + 120
            while True:  # commands all along, until r1 is home again (and one more after)
                home = where("r1") == "rb-0"
                try:
                    ray.get(sup.call.remote("r1", "list", [], {}), timeout=60)
                    outcomes.append("ok")
                except RayTaskError as exc:
                    outcomes.append(f"{type(exc.cause).__name__}: {exc.cause}")
                if home:
                    break
                assert time.monotonic() < deadline, "r1 never returned to rb-0"
            assert [o for o in outcomes if o != "ok"] == [], outcomes
            report = ray.get(sup.placement_report.remote(), timeout=20)
            r1 = [(m["from"], m["to"], m["reason"]) for m in report["moves"] if m["session"] == "r1"]
            assert [m[:2] for m in r1] == [("rb-0", "rb-1"), ("rb-1", "rb-0")], report["moves"]
            assert r1[0][2].startswith("unreachable") and r1[1][2] == "rebalance", r1
            assert not [m for m in report["moves"] if "error" in m], report["moves"]
            assert [(r["actor"], r["retired"]) for r in report["returned"]] == [("rb-0", "dead")], report
            assert report["placement"] == {"r1": "rb-0", "r2": "rb-1"}
            pinged: Any = ray.get(ray.get_actor(ACTOR_PREFIX + "rb-0").ping.remote(), timeout=20)
            assert pinged["sessions"] == ["r1"], pinged
        finally:
            ray.get(sup.stop.remote(), timeout=90)
            ray.kill(sup)
