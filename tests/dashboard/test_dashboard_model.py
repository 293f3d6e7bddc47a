"""The dashboard's model (flowbus/dashboard/_model.py): sans-I/O, fed events by hand."""

from __future__ import annotations

from typing import Any

import pytest

from flowbus.bus import Match
from flowbus.dashboard import DashboardModel, parse_match, visible_ops
from flowbus.schemas import (
    AttributeChanged,
    Connected,
    Disconnected,
    Forgotten,
    MatchSyntaxError,
    RecoveryAttempted,
    RuleFired,
    State,
    StateChanged,
)

S = 1_000_000_000  # ns


def st(key: str, state: State, seq: int, t: int, source: str = "prod", backend: str = "ecflow",
       **kw: object) -> StateChanged:
    return StateChanged(source=source, backend=backend, key=key, state=state, seq=seq, time=t * S, **kw)  # type: ignore[arg-type]


def rows(ops: list[Any]) -> dict[str, dict[str, Any]]:
    return {op["row"]["id"]: op["row"] for op, _ev in ops if op["op"] == "row"}


def seg(m: DashboardModel, rid: str) -> list[Any]:
    row = m.row(rid)
    assert row is not None
    return list(row["segments"])


class TestRows:
    def test_a_state_change_makes_a_row_with_its_tree_path_reason_and_timeline(self) -> None:
        """An ecFlow task's key becomes backend -> session -> suite -> family -> task; an abort
        carries its reason; each new state opens a timeline interval."""
        m = DashboardModel(now=lambda: 100 * S)
        m.apply(st("/s/f/t", State.ACTIVE, 1, 10))
        ops = m.apply(st("/s/f/t", State.ABORTED, 2, 20, detail="exit code 3", native="aborted"))
        row = rows(ops)["ecflow/prod//s/f/t"]
        assert row["path"] == ["ecflow", "prod", "s", "f", "t"]
        assert (row["state"], row["native"], row["reason"]) == ("aborted", "aborted", "exit code 3")
        assert row["segments"] == [["active", 10 * S], ["aborted", 20 * S]]
        assert row["final"] is True

    def test_an_older_event_does_not_replace_a_newer_state(self) -> None:
        """Events replayed out of order (a snapshot, then live) keep the newest state per row."""
        m = DashboardModel(now=lambda: 100 * S)
        m.apply(st("j", State.COMPLETE, 5, 50, backend="qcg"))
        row = rows(m.apply(st("j", State.ACTIVE, 3, 30, backend="qcg")))["qcg/prod/j"]
        assert row["state"] == "complete"

    def test_a_forgotten_resource_leaves_the_tree(self) -> None:
        """A Forgotten event (retention passed) removes the row; other rows stay."""
        m = DashboardModel(now=lambda: 100 * S)
        m.apply(st("j1", State.COMPLETE, 1, 10, backend="qcg"))
        m.apply(st("j2", State.COMPLETE, 2, 11, backend="qcg"))
        ops = m.apply(Forgotten(source="prod", backend="qcg", key="j1", seq=3, last_state=State.COMPLETE))
        assert ({"op": "remove", "id": "qcg/prod/j1"}, None) in ops
        assert m.row("qcg/prod/j1") is None and m.row("qcg/prod/j2") is not None
        assert len(m) == 1

    def test_progress_comes_from_progress_attributes_and_is_clamped(self) -> None:
        """A DiFX progress attribute fills the row's progress bar (0..100)."""
        m = DashboardModel(now=lambda: 100 * S)
        m.apply(st("job1", State.ACTIVE, 1, 1, backend="guiserver", source="difx"))
        ev = AttributeChanged(source="difx", backend="guiserver", key="job1", kind="progress", name="percent",
                              value=42.5, seq=2, time=2 * S)
        assert rows(m.apply(ev))["guiserver/difx/job1"]["progress"] == 42.5
        ev2 = AttributeChanged(source="difx", backend="guiserver", key="job1", kind="progress", name="percent",
                               value=140, seq=3, time=3 * S)
        assert rows(m.apply(ev2))["guiserver/difx/job1"]["progress"] == 100.0

    def test_rows_are_bounded_least_recently_changed_first(self) -> None:
        """Beyond max_resources the row changed longest ago is removed, and the browser told."""
        m = DashboardModel(max_resources=2, now=lambda: 100 * S)
        m.apply(st("a", State.ACTIVE, 1, 1))
        m.apply(st("b", State.ACTIVE, 2, 2))
        m.apply(st("a", State.COMPLETE, 3, 3))
        ops = m.apply(st("c", State.ACTIVE, 4, 4))
        assert {"op": "remove", "id": "ecflow/prod/b"} in [op for op, _ in ops]
        assert len(m) == 2 and m.dropped_rows == 1

    def test_the_timeline_keeps_the_window_and_its_bound(self) -> None:
        """Intervals that ended before the window go, a row keeps its current one however old,
        and at most max_timeline intervals are kept over all rows."""
        now = {"t": 0}
        m = DashboardModel(hours=1.0, max_timeline=4, now=lambda: now["t"])
        for i, state in enumerate([State.QUEUED, State.ACTIVE, State.COMPLETE]):
            m.apply(st("old", state, i + 1, i))
        now["t"] = 7200 * S  # two hours later: only the current interval of "old" is left
        m.apply(st("new", State.ACTIVE, 10, 7200))
        assert seg(m, "ecflow/prod/old") == [["complete", 2 * S]]
        for i, state in enumerate([State.SUSPENDED, State.ACTIVE, State.COMPLETE, State.ABORTED]):
            m.apply(st("new", state, 11 + i, 7201 + i))
        total = len(seg(m, "ecflow/prod/old")) + len(seg(m, "ecflow/prod/new"))
        assert total <= 4 + 1  # the bound, plus the current interval a row always keeps
        assert seg(m, "ecflow/prod/new")[-1][0] == "aborted"


class TestStaleness:
    def test_a_disconnect_greys_the_sources_rows_and_a_reconnect_does_not_unless_resynced(self) -> None:
        """Rows of a disconnected session are marked stale (with the reason and since when);
        the session itself shows down with the reason."""
        m = DashboardModel(now=lambda: 100 * S)
        m.apply(Connected(source="prod", backend="ecflow", seq=1, time=1 * S))
        m.apply(st("/s/t", State.ACTIVE, 2, 2))
        ops = m.apply(Disconnected(source="prod", backend="ecflow", seq=3, time=3 * S, reason="connection refused"))
        row = rows(ops)["ecflow/prod//s/t"]
        assert row["stale"].startswith("disconnected") and "connection refused" in row["stale"]
        assert row["stale_since"] == 3 * S
        sessions = [op["session"] for op, _ in ops if op["op"] == "session"]
        assert sessions[-1]["up"] is False and sessions[-1]["reason"] == "connection refused"
        fresh = rows(m.apply(st("/s/t", State.COMPLETE, 5, 5)))["ecflow/prod//s/t"]
        assert fresh["stale"] == ""  # newer than the disconnect: someone vouches for it


class TestFeed:
    def test_rule_firings_recoveries_and_failures_are_in_the_feed(self) -> None:
        """What an operator watches scroll: firings, recoveries (failed ones as errors), aborts."""
        m = DashboardModel(now=lambda: 100 * S)
        m.apply(RuleFired(source="orchestrator", backend="flowbus", rule="start-ens", seq=1, time=S))
        m.apply(RecoveryAttempted(source="q", backend="qcg", key="j", action="resubmit", ok=False, reason="exit 1",
                                  seq=1, time=2 * S))
        m.apply(st("j", State.ABORTED, 2, 3, source="q", backend="qcg", detail="exit code 1"))
        feed = m.snapshot()["feed"]
        assert [(f["kind"], f["level"]) for f in feed] == [("rule", "info"), ("recovery", "error"), ("failure", "error")]
        assert "start-ens" in feed[0]["text"] and "exit code 1" in feed[2]["text"]


class TestFilter:
    def test_a_match_filters_rows_and_a_row_that_stops_matching_is_removed(self) -> None:
        """The filter is a match expression; a row leaving it becomes a remove op."""
        m = DashboardModel(now=lambda: 100 * S)
        match = Match("ecflow/*/state/* state=aborted")
        ops = m.apply(st("/s/t", State.ABORTED, 1, 1))
        assert [op["op"] for op in visible_ops(ops, match)] == ["row", "feed"]
        ops = m.apply(st("/s/t", State.QUEUED, 2, 2))
        assert visible_ops(ops, match) == [{"op": "remove", "id": "ecflow/prod//s/t"}]
        assert m.snapshot(match)["rows"] == []

    def test_the_filter_box_takes_prefixes_and_refuses_typos_with_a_hint(self) -> None:
        """A bare prefix covers what is below it; a typo in a field, a state or a session is
        refused by the bus' own parser, naming what was meant."""
        m = parse_match("qcg/", {"local"})
        assert m is not None and m.glob == "qcg/*"
        assert parse_match("  ", set()) is None
        with pytest.raises(MatchSyntaxError, match="did you mean 'state'"):
            parse_match("qcg/* stat=complete", {"local"})
        with pytest.raises(MatchSyntaxError, match="did you mean 'complete'"):
            parse_match("qcg/local/state/x state=complet", {"local"})
        with pytest.raises(MatchSyntaxError, match="did you mean 'local'"):
            parse_match("qcg/lcoal/state/", {"local"})
