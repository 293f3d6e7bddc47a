"""Attributes beyond events, meters and labels reach emit as AttributeChanged (real ecflow_server):
variables, repeats, limits, the late and zombie flags, trigger/complete expressions and time
attributes; an attribute added or deleted is an event too."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowbus.schemas import AttributeChanged, Event
from flowbus.services.ecflow._tree import Scalar
from support import ecflow as _fx
from support.ecflow import EcfServer, Running, write_suite
from support.recorder import show

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session

Server = Callable[..., EcfServer]
Session = Callable[..., Running]

SUITE = """\
limit L 5
task t
  defstatus suspended
  edit V 'one'
  repeat enumerated E "a" "b" "c"
  trigger u == complete
  complete u == aborted
  time 23:59
task u
  defstatus suspended
  repeat integer I 1 10 1
"""


def attr(run: Running, key: str, kind: str, name: str, value: Scalar, timeout: float = 10) -> AttributeChanged:
    """Wait for the AttributeChanged ``key``/``kind``/``name`` = ``value``."""
    def found(events: list[Event]) -> list[AttributeChanged]:
        return [e for e in events if isinstance(e, AttributeChanged) and (e.key, e.kind, e.name, e.value)
                == (key, kind, name, value)]
    return run.rec.wait_for(found, timeout, f"{key} {kind} {name}={value!r}")[0]


class TestAttributes:
    """Each kind is published when loaded, when changed by alter, and when added or deleted."""

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize(("alter", "expect"), [
        (("change", "variable", "V", "two"), ("/a/t", "variable", "V", "two", "one")),
        (("add", "variable", "W", "new"), ("/a/t", "variable", "W", "new", None)),
        (("delete", "variable", "V", ""), ("/a/t", "variable", "V", None, "one")),
        (("change", "repeat", "b", ""), ("/a/t", "repeat", "E", "b", "a")),
        (("change", "trigger", "u == aborted", ""), ("/a/t", "trigger", "expression", "u == aborted",
                                                     "u == complete")),
        (("change", "complete", "u == unknown", ""), ("/a/t", "complete", "expression", "u == unknown",
                                                     "u == aborted")),
        (("delete", "trigger", "", ""), ("/a/t", "trigger", "expression", None, "u == complete")),
        (("delete", "time", "23:59", ""), ("/a/t", "time", "time 23:59", None, True)),
        (("add", "today", "23:58", ""), ("/a/t", "today", "today 23:58", True, None)),
        (("set_flag", "late", "", ""), ("/a/t", "flag", "late", True, None)),
        (("set_flag", "zombie", "", ""), ("/a/t", "flag", "zombie", True, None)),
        (("change", "limit_max", "L", "7"), ("/a", "limit_max", "L", 7, 5)),
        (("change", "limit_value", "L", "2"), ("/a", "limit", "L", 2, 0)),
    ], ids=lambda v: "-".join(str(x) for x in v[:2]) if isinstance(v, tuple) and len(v) == 4 else None)
    def test_alter_is_published(self, ecf_server: Server, ecflow_session: Session,
                                alter: tuple[str, str, str, str], expect: tuple[str, str, str, Scalar, Scalar]) -> None:
        """The loaded value is published first, then the altered one with the loaded value as previous."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "a", SUITE, {}))
        key, kind, name, value, previous = expect
        if previous is not None:
            attr(run, key, kind, name, previous)
        path = "/a" if kind.startswith("limit") else "/a/t"
        run.call("alter", path, *alter)
        got = attr(run, key, kind, name, value)
        assert got.previous == previous, show(got)

    @pytest.mark.timeout(60)
    def test_repeat_values_as_the_server_holds_them(self, ecf_server: Server, ecflow_session: Session) -> None:
        """An integer repeat is an int; an enumerated repeat is its current text, not its index."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "a", SUITE, {}))
        attr(run, "/a/u", "repeat", "I", 1)
        attr(run, "/a/t", "repeat", "E", "a")
        run.call("alter", "/a/u", "change", "repeat", "4")
        attr(run, "/a/u", "repeat", "I", 4)
        assert run.call("query", "repeat", "/a/u") == "4"

    @pytest.mark.timeout(60)
    def test_flag_set_then_cleared(self, ecf_server: Server, ecflow_session: Session) -> None:
        """An unset flag is not published; set it is True, cleared it is False (previous True)."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "a", SUITE, {}))
        attr(run, "/a/t", "repeat", "E", "a")
        assert not [e for e in run.rec.of(AttributeChanged) if e.kind == "flag"]
        run.call("alter", "/a/t", "set_flag", "late")
        attr(run, "/a/t", "flag", "late", True)
        run.call("alter", "/a/t", "clear_flag", "late")
        assert attr(run, "/a/t", "flag", "late", False).previous is True
