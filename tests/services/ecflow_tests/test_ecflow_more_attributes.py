"""The rest of ecFlow's node attributes reach emit as AttributeChanged (real ecflow_server):
inlimits, queues, generics, verifies, late, zombie policies, autocancel/autoarchive/autorestore,
defstatus and the suite clock. Each is published when loaded, changed and deleted, by ``alter``
where ecFlow can alter it, and by ``replace`` where it cannot."""

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
clock real 1.1.2020
limit L 5
family f
  inlimit /x:L 2
  late -c +02:00
  task t
    defstatus suspended
    queue q a b c
    generic g one two
    zombie ecf_passwd:fob::
endfamily
"""
#: the extras only ``replace`` can change: a family and a task carrying them (v1, v2) or not (v0)
EXTRAS = {
    0: "family g\n  task u\n    defstatus complete\n  family h\n  endfamily\nendfamily\n",
    1: "family g\n  autocancel +01:00\n  autorestore /x/f\n  task u\n    verify complete:3\n    queue q a b\n"
       "    generic g one\n  family h\n    autoarchive +01:00\n  endfamily\nendfamily\n",
    2: "family g\n  autocancel +02:00\n  autorestore /x/g\n  task u\n    verify complete:4\n    queue q b c\n"
       "    generic g two\n  family h\n    autoarchive +03:00\n  endfamily\nendfamily\n",
}


def attr(run: Running, key: str, kind: str, name: str, value: Scalar, since: int = 0,
         timeout: float = 10) -> AttributeChanged:
    """Wait for the AttributeChanged ``key``/``kind``/``name`` = ``value`` (after event ``since``)."""
    def found(events: list[Event]) -> list[AttributeChanged]:
        return [e for e in events[since:] if isinstance(e, AttributeChanged)
                and (e.key, e.kind, e.name, e.value) == (key, kind, name, value)]
    return run.rec.wait_for(found, timeout, f"{key} {kind} {name}={value!r}")[0]


class TestMoreAttributes:
    """Each kind: the loaded value, then the altered one (previous: the loaded one)."""

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize(("path", "alter", "expect"), [
        ("/x/f", ("delete", "inlimit", "/x:L", ""), ("inlimit", "/x:L", None, 2)),
        ("/x/f/t", ("add", "inlimit", "/x:L", "1"), ("inlimit", "/x:L", 1, None)),
        ("/x/f", ("change", "late", "-s +00:10 -c +02:00", ""), ("late", "late", "late -s +00:10 -c +02:00",
                                                                 "late -c +02:00")),
        ("/x/f", ("delete", "late", "", ""), ("late", "late", None, "late -c +02:00")),
        ("/x/f/t", ("add", "late", "-a 20:00", ""), ("late", "late", "late -a 20:00", None)),
        ("/x/f/t", ("delete", "queue", "q", ""), ("queue", "q", None, "a")),
        ("/x/f/t", ("delete", "generic", "g", ""), ("generic", "g", None, "one two")),
        ("/x/f/t", ("delete", "zombie", "ecf_passwd", ""), ("zombie_policy", "ecf_passwd", None,
                                                            "zombie ecf_passwd:fob::3600")),
        ("/x/f", ("add", "zombie", "user:fail::", ""), ("zombie_policy", "user", "zombie user:fail::300", None)),
        ("/x/f/t", ("change", "defstatus", "complete", ""), ("defstatus", "defstatus", "complete", "suspended")),
        ("/x/f/t", ("change", "defstatus", "queued", ""), ("defstatus", "defstatus", None, "suspended")),
        ("/x", ("change", "clock_gain", "3600", ""), ("clock", "clock", "clock real 1.1.2020 +3600",
                                                     "clock real 1.1.2020")),
    ], ids=lambda v: "-".join(str(x) for x in v[:2]) if isinstance(v, tuple) and len(v) == 4 else None)
    def test_alter_is_published(self, ecf_server: Server, ecflow_session: Session, path: str,
                                alter: tuple[str, str, str, str], expect: tuple[str, str, Scalar, Scalar]) -> None:
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "x", SUITE, {}))
        kind, name, value, previous = expect
        if previous is not None:
            attr(run, path, kind, name, previous)
        else:
            attr(run, "/x/f/t", "queue", "q", "a")  # loaded
            assert not [e for e in run.rec.of(AttributeChanged, path) if (e.kind, e.name) == (kind, name)]
        n = len(run.rec.events)
        run.call("alter", path, *alter)
        got = attr(run, path, kind, name, value, since=n)
        assert got.previous == previous, show(got)

    @pytest.mark.timeout(60)
    def test_replace_adds_changes_and_deletes(self, ecf_server: Server, ecflow_session: Session) -> None:
        """verify, autocancel, autoarchive, autorestore, queue and generic: added, changed, deleted."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "x", SUITE + EXTRAS[0], {}))
        attr(run, "/x/g/u", "defstatus", "defstatus", "complete")
        expected: dict[int, dict[tuple[str, str, str], Scalar]] = {
            1: {("/x/g", "autocancel", "autocancel"): "autocancel +01:00",
                ("/x/g/h", "autoarchive", "autoarchive"): "autoarchive +01:00",
                ("/x/g", "autorestore", "autorestore"): "autorestore /x/f",
                ("/x/g/u", "verify", "verify complete:3"): True,
                ("/x/g/u", "queue", "q"): "a", ("/x/g/u", "generic", "g"): "one",
                ("/x/g/u", "defstatus", "defstatus"): None},
            2: {("/x/g", "autocancel", "autocancel"): "autocancel +02:00",
                ("/x/g/h", "autoarchive", "autoarchive"): "autoarchive +03:00",
                ("/x/g", "autorestore", "autorestore"): "autorestore /x/g",
                ("/x/g/u", "verify", "verify complete:3"): None, ("/x/g/u", "verify", "verify complete:4"): True,
                ("/x/g/u", "queue", "q"): "b", ("/x/g/u", "generic", "g"): "two"},
        }
        # back to none of them: each attribute present after step 2 is deleted, defstatus is back
        expected[0] = {k: None for k, v in expected[2].items() if v is not None}
        expected[0][("/x/g/u", "defstatus", "defstatus")] = "complete"
        for step in (1, 2, 0):
            n = len(run.rec.events)
            run.call("replace", "/x/g", write_suite(server, "x", SUITE + EXTRAS[step], {}))
            for (key, kind, name), value in expected[step].items():
                attr(run, key, kind, name, value, since=n)

