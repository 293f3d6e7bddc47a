"""Real zombies (jobs whose child command carries a wrong ECF_PASS) on a real ecflow_server: each
is published as ``AttributeChanged(kind="zombie", name="ecf_passwd:<pid>")``, and every
``zombie_*`` operation has its effect on the job, the task and the events."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from flowbus.schemas import AttributeChanged, Event, Observed, State
from support import ecflow as _fx
from support import poll
from support.ecflow import EcfServer, Running, reached, server_states, write_suite

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session

Server = Callable[..., EcfServer]
Session = Callable[..., Running]

#: after its init, the job sends --complete with a wrong password: a zombie the server blocks;
#: the job writes whether the command came back ok or failed (the ERROR trap is off: a kill ends it)
ZOMBIE_JOB = """\
echo $$ > %ECF_HOME%/%TASK%.pid
trap - 0 1 2 3 15
set +e
export ECF_PASS=wrongpass
if ecflow_client --complete; then echo ok > %ECF_HOME%/%TASK%.out; else echo failed > %ECF_HOME%/%TASK%.out; fi
exit 0
"""
TASKS = ("fob", "fail", "adopt", "block", "kill")
WAIT = 30.0  # a blocked child command asks again every few seconds


def zombie(run: Running, task: str, value: str | None, since: int = 0) -> AttributeChanged:
    def found(events: list[Event]) -> list[AttributeChanged]:
        return [e for e in events[since:] if isinstance(e, AttributeChanged) and e.kind == "zombie"
                and e.key == f"/z/{task}" and e.value == value]
    return run.rec.wait_for(found, WAIT, f"zombie of /z/{task} = {value!r}")[0]


def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    poll.until(check, timeout, what)


def text(home: Path, name: str) -> str:
    path = home / name
    return path.read_text().strip() if path.exists() else ""


class TestZombies:
    @pytest.mark.timeout(120)
    def test_each_zombie_operation_has_its_effect(self, ecf_server: Server, ecflow_session: Session) -> None:
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "z", "".join(f"task {t}\n" for t in TASKS),
                                     dict.fromkeys(TASKS, ZOMBIE_JOB)))
        run.call("begin_suite", "z")
        pids: dict[str, int] = {}
        for task in TASKS:
            seen = zombie(run, task, "auto-block")
            pids[task] = int(text(server.home, f"{task}.pid"))
            assert seen.name == f"ecf_passwd:{pids[task]}" and seen.previous is None, seen
        names = {t: f"ecf_passwd:{pid}" for t, pid in pids.items()}

        n = len(run.rec.events)
        for task in TASKS:  # all at once: a blocked child command asks again only every few seconds
            run.call("client", f"zombie_{task}", f"/z/{task}")
        # fob: the child command returns ok, the zombie leaves the list, the task is untouched
        until(lambda: text(server.home, "fob.out") == "ok", "fob: the child command returned ok")
        assert zombie(run, "fob", None, n).name == names["fob"]
        assert server_states(server)["/z/fob"] == "active"
        # fail: the child command fails; the zombie stays listed
        until(lambda: text(server.home, "fail.out") == "failed", "fail: the child command failed")
        assert zombie(run, "fail", "manual-fail", n).previous == "auto-block"
        # adopt: the server takes the job as the task's: its complete is applied
        run.rec.wait_for(reached("/z/adopt", State.COMPLETE), WAIT, "adopted zombie's complete applied")
        zombie(run, "adopt", None, n)
        assert text(server.home, "adopt.out") == "ok"
        # block: the child command keeps waiting
        assert zombie(run, "block", "manual-block", n).previous == "auto-block"
        # kill: the server runs ECF_KILL_CMD on the zombie's process
        assert zombie(run, "kill", "manual-kill", n).name == names["kill"]
        until(lambda: not psutil.pid_exists(pids["kill"]) or psutil.Process(pids["kill"]).status()
              == psutil.STATUS_ZOMBIE, "kill: the zombie's job process ended")
        assert text(server.home, "kill.out") != "ok"  # its child command was killed first, or nothing written
        assert psutil.pid_exists(pids["block"]) and not text(server.home, "block.out")
        # remove: the failed zombie's job asks no more, so it is gone for good
        n = len(run.rec.events)
        run.call("client", "zombie_remove", "/z/fail")
        assert zombie(run, "fail", None, n).previous == "manual-fail"
        assert not [z for z in run.call("client", "zombie_get", 0) if "/z/fail" in z]

    @pytest.mark.timeout(60)
    def test_zombies_of_unobserved_suites_are_left_out(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A session observing only suite ``a`` (change handle) publishes no zombie of suite ``z``,
        while a session observing everything does."""
        server = ecf_server()
        everything = ecflow_session(server.port)
        only_a = ecflow_session(server.port)
        everything.call("load", write_suite(server, "a", "task t\n  defstatus complete\n", {}))
        only_a.call("ch_register", False, ["a"])
        everything.call("load", write_suite(server, "z", "task fob\n", {"fob": ZOMBIE_JOB}))
        everything.call("begin_suite", "z")
        zombie(everything, "fob", "auto-block")
        seen_at = time.monotonic()
        # only_a reads the zombie list at least once a second: polls 1.5 s after the zombie was there
        until(lambda: bool(only_a.polls) and only_a.polls[-1] > seen_at + 1.5, "only_a polled past a zombie read")
        assert server_states(server)["/z/fob"] == "active" and everything.call("client", "zombie_get", 0)
        assert not [e for e in only_a.rec.events if isinstance(e, AttributeChanged) and e.kind == "zombie"]

    @pytest.mark.timeout(60)
    def test_a_session_started_later_finds_the_zombie_on_resync(self, ecf_server: Server,
                                                               ecflow_session: Session) -> None:
        """A zombie already there when a session starts is published observed=resync; a session
        seeded with that event publishes nothing for it, and its removal (value None) when it goes."""
        server = ecf_server()
        first = ecflow_session(server.port)
        first.call("load", write_suite(server, "z", "task fail\n", {"fail": ZOMBIE_JOB}))
        first.call("begin_suite", "z")
        zombie(first, "fail", "auto-block")
        later = ecflow_session(server.port, poll=False)
        found = [e for e in later.rec.events if isinstance(e, AttributeChanged) and e.kind == "zombie"]
        assert [(e.key, e.value, e.observed) for e in found] == [("/z/fail", "auto-block", Observed.RESYNC)], found
        seeded = ecflow_session(server.port, known={e.topic(): e for e in later.rec.events})
        assert not [e for e in seeded.rec.events if isinstance(e, AttributeChanged) and e.kind == "zombie"]
        first.call("client", "zombie_fail", "/z/fail")  # the job's command fails and the job ends
        until(lambda: text(server.home, "fail.out") == "failed", "fail: the child command failed")
        seeded.call("client", "zombie_remove", "/z/fail")
        gone = zombie(seeded, "fail", None)
        assert gone.previous in ("auto-block", "manual-fail") and gone.observed is Observed.POLL, gone
