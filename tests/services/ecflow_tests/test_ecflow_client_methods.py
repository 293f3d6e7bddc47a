"""ecflow.Client methods reached through the session (typed operations and ``client``), each with
its effect on a real ecflow_server asserted through another client, the server's files or the
session's events. One table: each row acts, then waits (bounded) until the server shows the effect."""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from flowbus.schemas import AttributeChanged, BackendRejected, Disconnected, Event, State, StateChanged
from support import ecflow as _fx
from support.ecflow import EcfServer, Running, ecflow, reached, server_states, write_suite
from support.recorder import show

ecf_server = _fx.ecf_server
ecflow_session = _fx.ecflow_session

Server = Callable[..., EcfServer]
Session = Callable[..., Running]

NEVER = "f/a == aborted"  # f/a is complete by default: never true
LATER = (datetime.datetime.now() + datetime.timedelta(hours=2)).strftime("%H:%M")  # not due during a test
SUITE = f"""\
family f
  task a
    defstatus complete
endfamily
task hold
  trigger {NEVER}
  label info ""
task timed
  time {LATER}
task dated
  date 1.1.2099
task both
  trigger {NEVER}
  date 1.1.2099
task slow
  defstatus suspended
  edit ECF_STATUS_CMD 'echo %ECF_NAME% %ECF_RID% > %ECF_HOME%/status.out'
"""
SCRIPTS = {"hold": "ecflow_client --label=info ran\n", "timed": "true\n", "dated": "true\n", "both": "true\n",
           "slow": "while true; do ecflow_client --label=info tick; sleep 0.1; done\n", "f/a": "true\n"}
OTHER = "task x\n  defstatus complete\n"


@dataclass(frozen=True)
class Case:
    """One method: ``act(run, server)``, then ``done(server)`` must become true within 20 s."""

    method: str
    act: Callable[[Running, EcfServer], Any]
    done: Callable[[EcfServer], bool]
    #: an event the session then publishes (among those after the call), when the effect is one
    published: Callable[[Event], bool] | None = None


def became(key: str, state: State, native: str = "") -> Callable[[Event], bool]:
    return lambda e: (isinstance(e, StateChanged) and e.key == key and e.state is state
                      and (not native or e.native == native))


def attr_is(key: str, kind: str, name: str, value: Any) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, AttributeChanged) and (e.key, e.kind, e.name, e.value) == (key, kind, name, value)


def defs_of(server: EcfServer) -> Any:
    client = server.client()
    client.sync_local()
    return client.get_defs()


def state(path: str, native: str) -> Callable[[EcfServer], bool]:
    return lambda server: server_states(server).get(path) == native


def server_state(name: str) -> Callable[[EcfServer], bool]:
    return lambda server: str(defs_of(server).get_server_state()) == name


def children(server: EcfServer, path: str) -> list[str]:
    node = defs_of(server).find_abs_node(path)
    return [] if node is None else [n.name() for n in node.nodes]


def in_log(text: str, log: str = "ecf.log") -> Callable[[EcfServer], bool]:
    return lambda server: (server.home / log).exists() and text in (server.home / log).read_text()


def _label_is(path: str, name: str, value: str) -> Callable[[EcfServer], bool]:
    def check(server: EcfServer) -> bool:
        node = defs_of(server).find_abs_node(path)
        return node is not None and any(lb.name() == name and lb.new_value() == value for lb in node.labels)
    return check


def _sorted_variables(server: EcfServer) -> bool:
    node = defs_of(server).find_abs_node("/o/hold")
    names = [v.name() for v in node.variables]
    return names == sorted(names) and len(names) == 2


def _add_zb(run: Running, _server: EcfServer) -> None:
    run.call("alter", "/o/hold", "add", "variable", "Z", "1")
    run.call("alter", "/o/hold", "add", "variable", "B", "2")
    run.call("client", "sort_attributes", "/o/hold", "variable", True)


def _archive_restore(run: Running, server: EcfServer) -> None:
    run.call("client", "archive", "/o/f")
    assert children(server, "/o/f") == [], "archived: the family's nodes leave the server"
    run.call("client", "restore", "/o/f")


def _edit_submit(run: Running, _server: EcfServer) -> None:
    lines = ["%include <head.h>", "ecflow_client --label=info edited", "%include <tail.h>"]
    run.call("client", "edit_script_submit", "/o/hold", [], lines, False, True)


def _log_elsewhere(run: Running, server: EcfServer) -> None:
    run.call("client", "new_log", str(server.home / "other.log"))
    run.call("client", "log_msg", "flowbus-elsewhere")


def _flush_then_log(run: Running, _server: EcfServer) -> None:
    run.call("client", "flush_log")
    run.call("client", "log_msg", "flowbus-after-flush")


def _kill_active(run: Running, server: EcfServer) -> None:
    run.call("resume", "/o/slow")
    run.rec.wait_for(reached("/o/slow", State.ACTIVE), 20, "slow active")
    run.call("kill", "/o/slow")


def _status_of_active(run: Running, server: EcfServer) -> None:
    run.call("resume", "/o/slow")
    run.rec.wait_for(reached("/o/slow", State.ACTIVE), 20, "slow active")
    run.call("client", "status", "/o/slow")


def _status_ran(server: EcfServer) -> bool:
    """ECF_STATUS_CMD ran for the job: it wrote the task's path and the job's process id."""
    out = server.home / "status.out"
    parts = out.read_text().split() if out.exists() else []
    return len(parts) == 2 and parts[0] == "/o/slow" and parts[1].isdigit()


#: Cases without ``published``: the node goes round to the state it was in (queued, complete,
#: queued) with no job run, possibly within the second of its last state change: between two
#: polls nothing tells it went anywhere (docs/backends/ecflow.md, Limits).
CASES = [
    Case("status", _status_of_active, _status_ran),
    Case("kill", _kill_active, state("/o/slow", "aborted"), became("/o/slow", State.ABORTED)),
    Case("replace", lambda run, s: run.call("replace", "/o/hold", write_suite(s, "o", SUITE.replace(
        'label info ""', 'label info "replaced"'), SCRIPTS)), lambda s: any(
        lb.value() == "replaced" for lb in defs_of(s).find_abs_node("/o/hold").labels),
         attr_is("/o/hold", "label", "info", "replaced")),
    Case("delete_all", lambda run, s: run.call("client", "delete_all", True), lambda s: defs_of(s) is None
         or not list(defs_of(s).suites), attr_is("/", "suite", "o", False)),
    Case("order", lambda run, s: run.call("client", "order", "/o/f", "bottom"), lambda s: children(s, "/o")[-1] == "f"),
    Case("free_trigger_dep", lambda run, s: run.call("client", "free_trigger_dep", "/o/hold"),
         state("/o/hold", "complete"), became("/o/hold", State.COMPLETE)),
    Case("free_time_dep", lambda run, s: run.call("client", "free_time_dep", "/o/timed"), in_log("complete: /o/timed"),
         became("/o/timed", State.COMPLETE)),
    Case("free_date_dep", lambda run, s: run.call("client", "free_date_dep", "/o/dated"), in_log("complete: /o/dated")),  # no event: see below
    Case("free_all_dep", lambda run, s: run.call("client", "free_all_dep", "/o/both"), in_log("complete: /o/both")),  # no event: see below
    Case("run", lambda run, s: run.call("run", "/o/hold"), _label_is("/o/hold", "info", "ran"),
         attr_is("/o/hold", "label", "info", "ran")),
    Case("force_state", lambda run, s: run.call("force_state", "/o/hold", "complete"), state("/o/hold", "complete"),
         became("/o/hold", State.COMPLETE)),
    Case("force_state_recursive", lambda run, s: run.call("force_state_recursive", "/o/f", "aborted"),
         state("/o/f/a", "aborted"), became("/o/f/a", State.ABORTED)),
    Case("archive+restore", _archive_restore, lambda s: children(s, "/o/f") == ["a"]
         and defs_of(s).find_abs_node("/o/f").get_flag().is_set(ecflow.FlagType.restored)),
    Case("edit_script_submit", _edit_submit, _label_is("/o/hold", "info", "edited"),
         attr_is("/o/hold", "label", "info", "edited")),
    Case("sort_attributes", _add_zb, _sorted_variables),
    Case("plug", lambda run, s: run.call("client", "plug", "/o/f", "/p"),
         lambda s: children(s, "/p") == ["x", "f"] and "f" not in children(s, "/o")),
    Case("group", lambda run, s: run.call("client", "group", "suspend=/o/timed; alter=add variable G 1 /o/timed"),
         lambda s: server_states(s).get("/o/timed") == "suspended"
         and any(v.name() == "G" for v in defs_of(s).find_abs_node("/o/timed").variables),
         attr_is("/o/timed", "variable", "G", "1")),
    Case("requeue", lambda run, s: (run.call("force_state", "/o/timed", "aborted"), run.call("requeue", "/o/timed")),
         lambda s: in_log("--requeue")(s) and server_states(s).get("/o/timed") == "queued"),
    Case("delete", lambda run, s: run.call("delete", "/o/dated", True), lambda s: "dated" not in children(s, "/o")),
    Case("log_msg", lambda run, s: run.call("client", "log_msg", "flowbus-hello"), in_log("flowbus-hello")),
    Case("new_log", _log_elsewhere, in_log("flowbus-elsewhere", "other.log")),
    Case("flush_log", _flush_then_log, in_log("flowbus-after-flush")),
    Case("clear_log", lambda run, s: run.call("client", "clear_log"), lambda s: "--load" not in
         (s.home / "ecf.log").read_text()),
    Case("halt_server", lambda run, s: run.call("halt_server"), server_state("HALTED"),
         became("/", State.SUSPENDED, "HALTED")),
    Case("shutdown_server", lambda run, s: run.call("shutdown_server"), server_state("SHUTDOWN"),
         became("/", State.SUSPENDED, "SHUTDOWN")),
    Case("checkpt", lambda run, s: run.call("checkpt"), lambda s: s.check_file.exists() and "suite o" in s.check_file.read_text()),
    Case("terminate_server", lambda run, s: run.call("terminate_server"),
         lambda s: s.proc is not None and s.proc.poll() is not None, lambda e: isinstance(e, Disconnected)),
]


class TestClientMethods:
    """Each method changes the server as ecFlow documents it."""

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("case", CASES, ids=[c.method for c in CASES])
    def test_method_has_its_effect(self, ecf_server: Server, ecflow_session: Session, case: Case) -> None:
        """The effect is not there before the call, and is there (on the server) after it."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "o", SUITE, SCRIPTS))
        run.call("load", write_suite(server, "p", OTHER, {}))
        run.call("begin_all_suites")
        run.rec.wait_for(reached("/o/f/a", State.COMPLETE), 10, "suite begun")
        assert not case.done(server), f"{case.method}: the effect is there before the call"
        n = len(run.rec.events)
        case.act(run, server)
        deadline = time.monotonic() + 20
        while not case.done(server):
            assert time.monotonic() < deadline, f"{case.method}: no effect on the server after 20 s"
            time.sleep(0.05)
        if case.published is not None:
            published = case.published
            run.rec.wait_for(lambda es: [e for e in es[n:] if published(e)], 10, f"{case.method}: its event")

    @pytest.mark.timeout(60)
    def test_script_views_and_plain_answers(self, ecf_server: Server, ecflow_session: Session) -> None:
        """edit_script_edit/preprocess return the script before and after pre-processing; the
        client's own answers (host, port, version, sync flags) are plain data."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "o", SUITE, SCRIPTS))
        raw = run.call("client", "edit_script_edit", "/o/hold")
        assert "%include <head.h>" in raw and "--label=info ran" in raw, raw
        pre = run.call("client", "edit_script_preprocess", "/o/hold")
        assert "%include" not in pre and "ecflow_client --init" in pre and "--label=info ran" in pre, pre
        assert run.call("client", "get_host") == "127.0.0.1"
        assert run.call("client", "get_port") == str(server.port)
        assert run.call("client", "version") == run.call("server_version") == "5.9.2"
        assert run.call("client", "wait_for_server_reply", 1) is True
        assert run.call("client", "is_auto_sync_enabled") is False
        assert isinstance(run.call("client", "in_sync"), bool)
        assert run.call("client", "set_zombie_child_timeout", 60) is None
        with pytest.raises(BackendRejected, match=r"ECF_LISTS file (\S+) does not exist") as info:
            run.call("client", "reload_wl_file")
        lists = re.search(r"ECF_LISTS file (\S+) does not exist", str(info.value))
        assert lists is not None
        (server.home / lists.group(1)).write_text("4.4.14\n*\n")  # everyone may read and write
        run.call("client", "reload_wl_file")
        before = run.call("stats")
        assert "Load definition" in before, before
        run.call("client", "stats_reset")
        assert "Load definition" not in run.call("stats")

    @pytest.mark.timeout(60)
    def test_password_files_are_read_again(self, ecf_server: Server, ecflow_session: Session) -> None:
        """reload_custom_passwd_file and reload_passwd_file make the server read its password files:
        refused naming a missing file, accepted once it exists, and a password file that gives this
        user a password the client does not send locks the client out (ecFlow's words)."""
        import getpass

        server = ecf_server()
        run = ecflow_session(server.port)
        files = {}
        for reload, var in (("reload_custom_passwd_file", "ECF_CUSTOM_PASSWD"), ("reload_passwd_file", "ECF_PASSWD")):
            with pytest.raises(BackendRejected, match=rf"The {var} file (\S+) does not exist") as info:
                run.call("client", reload)
            named = re.search(rf"The {var} file (\S+) does not exist", str(info.value))
            assert named is not None
            files[reload] = server.home / named.group(1)
        files["reload_custom_passwd_file"].write_text("4.5.0\n")  # no custom users
        run.call("client", "reload_custom_passwd_file")
        files["reload_passwd_file"].write_text(f"4.5.0\n{getpass.getuser()} 127.0.0.1 {server.port} not-sent\n")
        run.call("client", "reload_passwd_file")
        with pytest.raises(BackendRejected, match=r"authentication failed"):
            run.call("client", "ping")

    @pytest.mark.timeout(60)
    def test_check_status_and_server_debug(self, ecf_server: Server, ecflow_session: Session) -> None:
        """check reports a trigger on an extern node the server lacks; status is refused for a task
        of a suite not begun, in the server's words; debug_server_on makes the server write to its stdout."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", "extern /nosuch/x\n" + write_suite(server, "c", "task t\n  trigger /nosuch/x == complete\n",
                                                             {"t": "true\n"}))
        for args in (("/c",), ()):
            assert "Could not find referenced node, using absolute path '/nosuch/x" in run.call("check", *args)
        with pytest.raises(BackendRejected, match=r"must be .begun. first"):
            run.call("client", "status", "/c/t")
        out = server.home / "server.out"
        size = out.stat().st_size
        run.call("client", "debug_server_on")
        run.call("ping")
        run.call("client", "debug_server_off")
        deadline = time.monotonic() + 10
        while out.stat().st_size == size:
            assert time.monotonic() < deadline, "the server wrote no debug output"
            time.sleep(0.05)

    @pytest.mark.timeout(60)
    def test_archive_restore_plug_events(self, ecf_server: Server, ecflow_session: Session) -> None:
        """Archived children are published removed, restored ones come back, plugged nodes move paths,
        and a task deleted from a suite that stays is removed."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "o", SUITE, SCRIPTS))
        run.call("load", write_suite(server, "p", OTHER, {}))
        run.call("begin_all_suites")
        run.rec.wait_for(reached("/o/f/a", State.COMPLETE), 10, "begun")
        n = len(run.rec.events)
        run.call("client", "archive", "/o/f")
        gone = run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, StateChanged) and e.key == "/o/f/a"],
                                10, "archived child removed")[0]
        assert gone.state is State.UNKNOWN and gone.native == "", show(gone)
        n = len(run.rec.events)
        run.call("client", "restore", "/o/f")
        back = run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, StateChanged) and e.key == "/o/f/a"],
                                10, "restored child")[0]
        assert back.native == "complete", show(back)
        n = len(run.rec.events)
        run.call("client", "plug", "/o/f", "/p")
        run.rec.wait_for(lambda es: {"/p/f/a", "/o/f/a"} <= {e.key for e in es[n:] if isinstance(e, StateChanged)},
                         10, "plugged under /p, gone from /o")
        moved = {e.key: e.native for e in run.rec.events[n:] if isinstance(e, StateChanged)}
        assert moved["/o/f/a"] == "" and moved["/p/f/a"] != "", moved
        n = len(run.rec.events)
        run.call("delete", "/p/x", True)  # a task of a suite that stays: ecFlow reports only '/p' changed
        removed = run.rec.wait_for(lambda es: [e for e in es[n:] if isinstance(e, StateChanged) and e.key == "/p/x"],
                                   10, "deleted task removed")[0]
        assert removed.state is State.UNKNOWN and removed.native == "", show(removed)


#: A task under a family whose trigger never holds: the server's own job generation (at begin,
#: after every command, on its timer) resolves dependencies top-down and stops at the family.
GATED = """\
task off
  defstatus complete
family held
  trigger off == aborted
  task t
    label info ""
endfamily
"""


class TestJobGeneration:
    """``job_generation(path)`` resolves dependencies from ``path`` downwards only (ecFlow's
    CtsNodeCmd JOB_GEN: ``Jobs(node).generate()``), and only while the server is RUNNING."""

    @pytest.mark.timeout(60)
    def test_submits_a_task_whose_ancestors_hold_it(self, ecf_server: Server, ecflow_session: Session) -> None:
        """A task held only by its family's trigger: job_generation on the task submits its job at
        once (try 1, job file written, the job runs); on the family, on the whole server, and on the
        task while the server is HALTED or SHUTDOWN, nothing is submitted."""
        server = ecf_server()
        run = ecflow_session(server.port)
        run.call("load", write_suite(server, "g", GATED, {"held/t": "ecflow_client --label=info ran\n"}))
        run.call("begin_suite", "g")
        run.rec.wait_for(reached("/g/off", State.COMPLETE), 10, "suite begun")
        job = server.home / "g" / "held" / "t.job1"

        def untouched(when: str) -> None:
            states = server_states(server)
            assert states.get("/g/held/t") == "queued", f"{when}: /g/held/t is {states.get('/g/held/t')}"
            assert not job.exists(), f"{when}: a job file was written"

        untouched("after begin")
        for halted in ("halt_server", "shutdown_server"):
            run.call(halted)
            run.call("client", "job_generation", "/g/held/t")
            untouched(f"job_generation on the task after {halted}")
        run.call("restart_server")
        untouched("after restart_server")
        for path in ("/g/held", "/g", ""):  # these honour the family's trigger
            run.call("client", "job_generation", path)
            untouched(f"job_generation({path!r})")
        n = len(run.rec.events)
        run.call("client", "job_generation", "/g/held/t")
        # the command returns once the server submitted the job: no wait needed to see it
        assert server_states(server).get("/g/held/t") in ("submitted", "active", "complete"), server_states(server)
        assert job.exists() and "--label=info ran" in job.read_text()
        done = run.rec.wait_for(lambda es: reached("/g/held/t", State.COMPLETE)(es[n:]), 20, "the job ran")
        assert done.try_no == 1, show(done)
        assert _label_is("/g/held/t", "info", "ran")(server)
        assert server_states(server).get("/g/held") == "complete"  # the family's trigger is still false
