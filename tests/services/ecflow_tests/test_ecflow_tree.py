"""The ecFlow session's tree diff on synthetic snapshots (no server)."""

from __future__ import annotations

import pytest

pytest.importorskip("ecflow", reason="python3-ecflow is not installed (bash scripts/dev.sh setup)")

from flowbus.schemas import AttributeChanged, Observed, StateChanged
from flowbus.services.ecflow._tree import NodeObs, Snapshot, Tree


def _snapshot(tasks: int, label: str = "") -> Snapshot:
    snap = Snapshot(full=True, server="RUNNING", suites=["s"])
    snap.nodes["/s"] = NodeObs("queued")
    for i in range(tasks):
        path = f"/s/t{i}"
        snap.nodes[path] = NodeObs("queued")
        snap.attrs[(path, "event", "ev")] = False
        snap.attrs[(path, "meter", "m")] = 0
        snap.attrs[(path, "label", "info")] = label
    return snap


class TestTreeDiff:
    """Full-tree diffs stay linear in the tree size and keep attributes exact."""

    @pytest.mark.timeout(20)
    def test_full_resync_of_a_big_tree_is_linear(self) -> None:
        """An unchanged 20,000-task full resync yields nothing and ends within the test's bound
        (it was quadratic: ~25 s; linear takes ~1 s; the timing itself is bench/ecflow_poll.py's)."""
        tree = Tree("e")
        first = tree.diff(_snapshot(20_000), Observed.RESYNC)
        assert len(first) == 1 + 1 + 20_001 + 60_000
        again = tree.diff(_snapshot(20_000), Observed.POLL)
        assert again == []

    @pytest.mark.timeout(30)
    def test_changed_and_deleted_attributes(self) -> None:
        """A changed label is one AttributeChanged; an attribute gone from a node is published with value None."""
        tree = Tree("e")
        tree.diff(_snapshot(3), Observed.POLL)
        snap = _snapshot(3, label="x")
        snap.attrs = {k: v for k, v in snap.attrs.items() if not (k[0] == "/s/t1" and k[1] == "meter")}
        events = tree.diff(snap, Observed.POLL)
        deleted = [e for e in events if isinstance(e, AttributeChanged) and e.kind == "meter"]
        assert [(e.key, e.name, e.value, e.previous) for e in deleted] == [("/s/t1", "m", None, 0)]
        events = [e for e in events if e not in deleted]
        assert all(isinstance(e, AttributeChanged) and e.kind == "label" and e.value == "x" for e in events)
        assert sorted(e.key for e in events) == ["/s/t0", "/s/t1", "/s/t2"]
        assert ("/s/t1", "meter", "m") not in tree.attrs and ("/s/t0", "meter", "m") in tree.attrs
        assert not [e for e in events if isinstance(e, StateChanged)]

    def test_new_run_in_the_same_state_is_a_transition(self) -> None:
        """Same state and try number on a new job run is published (marked rerun); an unknown run token is not."""
        tree = Tree("e")
        tree.diff(Snapshot(full=True, server="RUNNING", suites=["s"], nodes={"/s/t": NodeObs("aborted", 1, "trap")}),
                  Observed.RESYNC)
        same = Snapshot(full=False, server="RUNNING", suites=["s"], nodes={"/s/t": NodeObs("aborted", 1, "trap", "r1")})
        assert tree.diff(same, Observed.POLL) == [], "a token learnt for the first time is no transition"
        again = Snapshot(full=False, server="RUNNING", suites=["s"], nodes={"/s/t": NodeObs("aborted", 1, "trap", "r2")})
        events = tree.diff(again, Observed.POLL)
        assert [(type(e).__name__, e.key, getattr(e, "attrs", None)) for e in events] == [
            ("StateChanged", "/s/t", {"run": "r2", "rerun": True})]
        assert tree.diff(again, Observed.POLL) == []
