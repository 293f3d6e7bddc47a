"""The status table: an AGE and a REASON column, stale rows marked, colours only when asked."""

from __future__ import annotations

import io

from flowbus._render import age_text, print_table
from flowbus.schemas import Event, Snapshot, Staleness, State, StateChanged

NOW = 1_800_000_000 * 10**9


def job(key: str, state: State, seq: int, age_s: int, detail: str = "") -> StateChanged:
    return StateChanged(source="local", backend="qcg", key=key, state=state, native=state.value.upper(), seq=seq,
                        time=NOW - age_s * 10**9, detail=detail)


def test_age_reads_like_a_clock() -> None:
    assert [age_text(NOW - s * 10**9, NOW) for s in (5, 303, 8040, 273600)] == ["5s", "5m03s", "2h14m", "3d04h"]
    assert age_text(0, NOW) == "-"


def test_rows_say_how_long_ago_and_why() -> None:
    out = io.StringIO()
    events = [job("a", State.ABORTED, 3, 42, "exit code 3:\n  scr failed"), job("b", State.ACTIVE, 4, 5)]
    print_table(events, out, now_ns=NOW)
    header, a, b = out.getvalue().splitlines()
    assert header.split()[:11] == ["BACKEND", "SOURCE", "KEY", "KIND", "STATE", "NATIVE", "AGE", "SEQ", "OBSERVED",
                                   "REASON", "FRESHNESS"]
    assert a.split()[2:7] == ["a", "state", "aborted", "ABORTED", "42s"] and "exit code 3: scr failed" in a
    assert b.split()[6] == "5s"
    assert "\x1b[" not in out.getvalue()  # not a terminal: no colours


def test_colours_and_stale_rows() -> None:
    out = io.StringIO()
    snap = Snapshot(events=[], stale={"local": Staleness(source="local", since_seq=4, since_time=NOW,
                                                         reason="disconnected", detail="refused")})
    print_table([job("a", State.ABORTED, 3, 42), job("b", State.COMPLETE, 5, 1)], out, snapshot=snap, colour=True,
                now_ns=NOW)
    _, a, b = out.getvalue().splitlines()
    assert "\x1b[2m" in a and "stale since" in a and "(disconnected: refused)" in a  # dimmed, marked
    assert "\x1b[32m" in b and "stale since" not in b  # complete in green


def test_a_correlating_job_shows_one_line_per_tick() -> None:
    """The human live view (demo): per DiFX tick only the progress bar; warnings and states always."""
    from flowbus._render import Condenser, bar, describe
    from flowbus.schemas import AttributeChanged, Heartbeat, LogLine

    def ev(cls: type, key: str = "job", **kw: object) -> Event:
        made: Event = cls(source="difx", backend="guiserver", key=key, **kw)
        return made

    tick = [ev(LogLine, level="info", message="tick 2"), ev(LogLine, key="", level="info", message="mpifxcorr... tick 2"),
            ev(AttributeChanged, kind="weight", name="ant0", value=0.95),
            ev(AttributeChanged, kind="progress", name="percent", value=20.0)]
    c = Condenser()
    first = [ev(AttributeChanged, kind="progress", name="percent", value=10.0)]
    shown = [e for e in [*first, *tick, ev(LogLine, key="", level="warning", message="mpifxcorr complete"),
                         ev(StateChanged, state=State.COMPLETE, native="ENDED_GRACEFULLY"), ev(Heartbeat, key="")]
             if c.shows(e)]
    assert [type(e).__name__ for e in shown] == ["AttributeChanged", "AttributeChanged", "LogLine", "StateChanged"]
    assert c.hidden == 4
    assert describe(shown[1])[0] == f"progress {bar(20.0)}" == "progress [####----------------]  20%"
