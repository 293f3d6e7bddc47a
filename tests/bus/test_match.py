"""Match expressions are checked when parsed: a typo is refused at once, naming the known values."""

from __future__ import annotations

import pytest

from flowbus.bus import Match
from flowbus.schemas import MatchSyntaxError, State, StateChanged


@pytest.mark.parametrize(("expr", "needle"), [
    ("qcg/local/state/ens state=complet", "unknown state value 'complet' in 'qcg/local/state/ens state=complet'; "
                                          "did you mean 'complete'?"),
    ("qcg/local/state/ens stat=complete", "unknown field 'stat'"),
    ("qcg/local/state/ens final=maybe", "unknown final value 'maybe'"),
    ("qcg/local/state/ens type=stat", "unknown type value 'stat'"),
    ("qgc/local/state/ens", "unknown backend 'qgc'"),
    ("qcg/local/stat/ens", "unknown family 'stat'"),
    ("qcg/local/stat/", "unknown family 'stat'"),
    ("qcg/[/state/a", "'[' without its ']'"),
])
def test_typos_are_refused_with_the_known_values(expr: str, needle: str) -> None:
    with pytest.raises(MatchSyntaxError) as info:
        Match(expr)
    assert needle in str(info.value), str(info.value)
    assert "(known: " in str(info.value) or "without its" in str(info.value)


def test_a_near_miss_says_what_was_meant() -> None:
    with pytest.raises(MatchSyntaxError, match=r"did you mean 'state'\?"):
        Match("qcg/local/state/ens stat=complete")


def test_good_expressions_still_match() -> None:
    m = Match("qcg/*/state/job-[0-9] state=complete|aborted final=true")
    ev = StateChanged(source="local", backend="qcg", key="job-1", state=State.COMPLETE, native="SUCCEED")
    assert m(ev)
    assert not m(StateChanged(source="local", backend="qcg", key="job-1", state=State.ACTIVE, native="EXECUTING"))
    assert Match("*/local/* key=job-1")(ev)


def test_sessions_are_checked_against_a_running_config() -> None:
    """Against the sessions a config has: a literal session must be one of them (did you mean),
    a pattern must match one; names alone (the CLI's view) check the literal segment."""
    sessions = {"local": "qcg", "e1": "ecflow"}
    Match("qcg/local/state/a").check_sessions(sessions)
    Match("qcg/lo*/state/a").check_sessions(sessions)
    with pytest.raises(MatchSyntaxError, match=r"unknown qcg session 'lcoal'.*did you mean 'local'"):
        Match("qcg/lcoal/state/a").check_sessions(sessions)
    with pytest.raises(MatchSyntaxError, match=r"no ecflow session matches 'x\*'"):
        Match("ecflow/x*/state/a").check_sessions(sessions)
    with pytest.raises(MatchSyntaxError, match=r"unknown session 'e2'.*did you mean 'e1'"):
        Match("ecflow/e2/state/a").check_names(sessions)
    Match("flowbus/broker/bus/liveness/local").check_names(sessions)


def test_prefix_like_globs_are_accepted() -> None:
    """A glob that stops at a slash (the CLI's prefixes) names no family yet: accepted."""
    for text in ("qcg/", "qcg/s1/", "qcg/s1/state/", "flowbus/broker/bus/"):
        assert Match(text).prefix == text
