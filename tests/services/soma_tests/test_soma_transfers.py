"""File transfers of a SomaSession against real soma-workflow 6.0.13 controllers (light mode):
transfers registered alone (register, transfer, status, delete, each with its events), workflows
whose jobs declare input and output files, and errors that carry soma's own message.

Every test is bounded; the fixture stops each session and checks that no soma thread and no
job process is left.
"""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import soma_workflow.constants as soma_constants
import soma_workflow.engine as soma_engine
import soma_workflow.errors as soma_errors

from flowbus.schemas import (
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    ErrorEvent,
    Observed,
    RecoveryAttempted,
    SomaSessionConfig,
    State,
    parse_config,
    parse_workflow,
)
from flowbus.services.soma._ops import soma_errors_to_flowbus, soma_message
from support import soma as _fx
from support.soma import Running, latest

soma_session = _fx.soma_session
Session = Callable[..., Running]


def files_workflow(tmp_path: Path) -> tuple[dict[str, Any], Path, Path, Path]:
    """Two jobs: ``copy`` reads an input file and writes an intermediate one, ``upper`` reads it
    and writes the output file."""
    src, mid, out = tmp_path / "in.txt", tmp_path / "mid.txt", tmp_path / "out.txt"
    src.write_text("hello soma\n")
    spec = {"name": "files", "jobs": [
        {"name": "copy", "command": ["cp", str(src), str(mid)], "inputs": [str(src)], "outputs": [str(mid)]},
        {"name": "upper", "command": ["bash", "-c", 'tr a-z A-Z < "$0" > "$1"', str(mid), str(out)],
         "inputs": [str(mid)], "outputs": [str(out)], "after": ["copy"]},
    ]}
    return spec, src, mid, out


class TestStandaloneTransfers:
    """A transfer registered alone: register, transfer, status, delete, each published as a state."""

    @pytest.mark.timeout(90)
    def test_register_transfer_status_delete_with_events(self, soma_session: Session, tmp_path: Path) -> None:
        """The id register_transfer returns works with every transfer operation; each step is a StateChanged of transfer/<id>."""
        run = soma_session()
        src = tmp_path / "data.txt"
        src.write_text("payload\n")
        reg = run.call("register_transfer", True, str(src))
        tid = reg["transfer_id"]
        assert isinstance(tid, int) and reg["status"] == "on client side" and reg["client_path"] == str(src)
        key = f"transfer/{tid}"
        queued = run.state(key, lambda e: e.state is State.QUEUED, 30, "the registered transfer")
        assert queued.native == "on client side" and queued.attrs["transfer_id"] == tid
        assert queued.attrs["engine_path"] == reg["engine_path"]
        assert run.call("transfer_status", tid)[0] == "on client side"

        assert run.call("transfer_files", tid) is None  # the integer id; no error after the copy
        assert Path(reg["engine_path"]).read_text() == "payload\n"
        done = run.state(key, lambda e: e.state is State.COMPLETE, 30, "the transfer done")
        assert done.native == "on both sides"
        # a poll may have caught soma copying ("transfering client->cr", ACTIVE) in between
        assert run.rec.states(key)[0].state is State.QUEUED
        assert {e.native for e in run.rec.states(key)} <= {"on client side", "transfering client->cr", "on both sides"}
        assert run.call("transfer_status", tid) == ["on both sides", [100, 100]]
        assert run.call("transfer_status", key)[0] == "on both sides"  # the event key names the transfer
        assert str(tid) in run.call("transfers") and str(tid) in run.call("transfers", [tid])
        run.call("transfer_files", [key])  # a list, again: soma copies it again, no error

        run.call("delete_transfer", tid)
        gone = run.state(key, lambda e: e.state is State.UNKNOWN, 30, "the transfer deleted")
        assert gone.native == "" and gone.detail == "transfer deleted"
        n = len(run.rec.states(key))
        wf = run.call("submit_workflow", {"name": "after", "jobs": [{"name": "a", "command": ["true"]}]})
        run.final(str(wf), 60)  # polls went on meanwhile
        assert len(run.rec.states(key)) == n, "a deleted transfer is published once"

    @pytest.mark.timeout(90)
    def test_errors_carry_soma_messages(self, soma_session: Session) -> None:
        """Unknown ids get soma's own words (UnknownObjectError and its text); bad ids are rejected before soma."""
        run = soma_session()
        for op in ("transfer_status", "transfer_files", "delete_transfer"):
            with pytest.raises(BackendRejected) as info:
                run.call(op, 9999)
            assert str(info.value) == (f"session 's0': {op}: soma UnknownObjectError: "
                                       "The transfer 9999 is not valid or does not belong to user 1"), str(info.value)
            assert isinstance(info.value.__cause__, soma_errors.UnknownObjectError)
            with pytest.raises(BackendRejected, match=f"{op}: transfer_id must be an integer id, got 'nope'"):
                run.call(op, "nope")
        with pytest.raises(BackendRejected, match=r"workflow_status: soma UnknownObjectError: .*workflow id 4242"):
            run.call("workflow_status", 4242)
        with pytest.raises(BackendRejected, match=r"job_status: soma UnknownObjectError: .*4343"):
            run.call("job_status", 4343)
        with pytest.raises(BackendRejected, match="disposal_timeout must be a positive number of hours"):
            run.call("register_transfer", False, "/x", 0)
        with pytest.raises(BackendRejected, match="transfer_input_files: soma UnknownObjectError"):
            run.call("transfer_input_files", 4444)
        assert not run.errors

    @pytest.mark.timeout(60)
    def test_what_soma_would_skip_is_rejected(self, soma_session: Session, tmp_path: Path) -> None:
        """A missing input file, or an output no job wrote yet, is a BackendRejected naming it, not a silent no-op."""
        run = soma_session()
        missing = tmp_path / "missing.txt"
        with pytest.raises(BackendRejected, match=f"register_transfer: input file '{missing}' does not exist"):
            run.call("register_transfer", True, str(missing))
        out = run.call("register_transfer", False, str(tmp_path / "out.txt"))
        assert run.state(f"transfer/{out['transfer_id']}", lambda e: True, 30, "output registered").native == \
            "do not exist"
        with pytest.raises(BackendRejected, match=f"transfer {out['transfer_id']} has no file on either side yet"):
            run.call("transfer_files", out["transfer_id"])
        gone = tmp_path / "gone.txt"
        gone.write_text("x")
        tid = run.call("register_transfer", True, str(gone))["transfer_id"]
        gone.unlink()
        with pytest.raises(BackendRejected, match=f"transfer {tid}: client file '{gone}' does not exist"):
            run.call("transfer_files", [tid])
        assert run.call("transfer_status", tid)[0] == "on client side", "nothing was started"

    def test_empty_soma_messages_are_named(self) -> None:
        """soma errors without text are mapped with soma's type and what it wraps, never an empty message."""
        cases: list[tuple[BaseException, type[Exception], str]] = [
            (soma_errors.DatabaseError(StopIteration()), BackendUnavailable,
             "op: soma DatabaseError from StopIteration (soma gave no message)"),
            (soma_errors.TransferError(""), BackendRejected, "op: soma TransferError (soma gave no message)"),
            (soma_errors.EngineError("engine down"), BackendUnavailable, "op: soma EngineError: engine down"),
            (RuntimeError(), BackendProtocolError, "op: soma RuntimeError (soma gave no message)"),
        ]
        for exc, kind, text in cases:
            with pytest.raises(kind) as info, soma_errors_to_flowbus("op"):
                raise exc
            assert str(info.value) == text
            assert info.value.__cause__ is exc
        wrapped = soma_errors.DatabaseError(ValueError("bad row"))
        assert soma_message(wrapped) == "DatabaseError: bad row"


class TestWorkflowFiles:
    """A flowbus description declares each job's input and output files; soma moves them."""

    @pytest.mark.timeout(120)
    def test_workflow_with_input_and_output_files(self, soma_session: Session, tmp_path: Path) -> None:
        """Inputs are copied in at submission, the jobs read and write them where they run, outputs come back when done."""
        run = soma_session()
        spec, src, mid, out = files_workflow(tmp_path)
        wf = run.call("submit_workflow", spec)
        done = run.final(str(wf), 60)
        assert done.state is State.COMPLETE
        assert out.read_text() == "HELLO SOMA\n" and mid.read_text() == "hello soma\n"
        last = latest(run.rec)  # the workflow's final state comes after its files' states
        transfers = {k: e for k, e in last.items() if k.startswith(f"{wf}/transfer/")}
        assert len(transfers) == 3, sorted(last)
        assert {e.attrs["client_path"] for e in transfers.values()} == {str(src), str(mid), str(out)}
        assert all((e.state, e.native) == (State.COMPLETE, "on both sides") for e in transfers.values())
        assert all(e.attrs["workflow_id"] == wf for e in transfers.values())
        out_key = next(k for k, e in transfers.items() if e.attrs["client_path"] == str(out))
        # the engine-side copies are not the client paths: soma substituted them in the commands
        assert all(e.attrs["engine_path"] != e.attrs["client_path"] for e in transfers.values())
        rows = run.call("workflow_elements_status", wf)[1]
        assert {r[1][0] for r in rows} == {"on both sides"}

        run.call("delete_workflow", wf)
        gone = run.state(out_key, lambda e: e.state is State.UNKNOWN, 30, "the workflow's transfer gone")
        assert gone.detail == "workflow deleted"

    @pytest.mark.timeout(120)
    def test_soma_form_with_file_transfers(self, soma_session: Session, tmp_path: Path) -> None:
        """soma's own JSON form with FileTransfers (here from the serialize operation) moves its files the same way."""
        run = soma_session()
        spec, _src, _mid, out = files_workflow(tmp_path)
        soma_form = run.call("serialize", spec)
        assert len(soma_form["serialized_file_transfers"]) == 3
        wf = run.call("submit_workflow", soma_form)
        assert run.final(str(wf), 60).state is State.COMPLETE
        assert out.read_text() == "HELLO SOMA\n"

    @pytest.mark.timeout(90)
    def test_input_copied_while_the_engine_reads_its_status(self, soma_session: Session, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """An input copied between the engine's read of its status and its take of the "transfer ended" signals still starts the workflow.

        One pass of soma's engine loop reads the transfer statuses, then takes the signals; the
        session copies the inputs from its own thread right after submission. Under load the copy
        once landed in between and the workflow stayed not started. Here the engine's read of the
        input's old status is held until the copy has been signalled (and recorded, when nothing
        keeps it out of the pass), and the copy's end waits for that read, so every run lands
        in that window."""
        run = soma_session()
        built = run.session._built
        assert built is not None and built.engine is not None
        loop = built.engine.engine_loop
        db = loop._database_server
        assert built.engine._database_server is db
        read_old, signalled, recorded = threading.Event(), threading.Event(), threading.Event()
        read_status, set_status = db.get_transfer_status, db.set_transfer_status
        record_ended = db.add_workflow_ended_transfer
        signal_ended = soma_engine.WorkflowEngine.signalTransferEnded

        def read(transfer_id: Any, user_id: Any) -> Any:
            status = read_status(transfer_id, user_id)
            if threading.current_thread() is built.engine.engine_loop_thread and not read_old.is_set() and \
                    status in (soma_constants.FILES_ON_CLIENT, soma_constants.TRANSFERING_FROM_CLIENT_TO_CR):
                read_old.set()
                signalled.wait(10)  # the copy ends and is signalled now, after this read
                recorded.wait(2)  # and is recorded before this pass takes the signals, unless kept out
            return status

        def copied(transfer_id: Any, status: Any) -> None:
            if status == soma_constants.FILES_ON_CLIENT_AND_CR and \
                    threading.current_thread() is not built.engine.engine_loop_thread:
                read_old.wait(10)  # the copy ends after the engine read the old status
            set_status(transfer_id, status)

        def record(workflow_id: Any, transfer_id: Any) -> None:
            record_ended(workflow_id, transfer_id)
            recorded.set()

        def signal(engine: Any, transfer_id: Any, workflow_id: Any) -> None:
            signalled.set()
            signal_ended(engine, transfer_id, workflow_id)

        monkeypatch.setattr(db, "get_transfer_status", read)
        monkeypatch.setattr(db, "set_transfer_status", copied)
        monkeypatch.setattr(db, "add_workflow_ended_transfer", record)
        monkeypatch.setattr(soma_engine.WorkflowEngine, "signalTransferEnded", signal)
        spec, _src, _mid, out = files_workflow(tmp_path)
        wf = run.call("submit_workflow", spec)
        assert run.final(str(wf), 30).state is State.COMPLETE
        assert read_old.is_set() and signalled.is_set() and recorded.is_set(), "the engine read the input's old status"
        assert out.read_text() == "HELLO SOMA\n"

    @pytest.mark.timeout(120)
    def test_transfer_false_leaves_the_files_to_the_caller(self, soma_session: Session, tmp_path: Path) -> None:
        """Without transfer the jobs wait for their inputs until transfer_input_files; outputs come back on transfer_output_files."""
        run = soma_session()
        spec, _src, _mid, out = files_workflow(tmp_path)
        wf = run.call("submit_workflow", spec, transfer=False)
        key_in = run.state(f"{wf}/transfer/1", lambda e: True, 30, "the input transfer").key
        assert run.rec.states(key_in)[0].native == "on client side"
        assert run.call("job_status", run.call("job_ids", wf)["copy"]) == "not_submitted"
        run.call("transfer_input_files", wf)
        assert run.state(key_in, lambda e: e.state is State.COMPLETE, 30, "the input copied").native == "on both sides"
        assert run.final(str(wf), 60).state is State.COMPLETE
        assert not out.exists()
        out_ev = run.state(f"{wf}/transfer/3", lambda e: e.native == "on computing resource side", 30, "output produced")
        assert out_ev.state is State.ACTIVE
        run.call("transfer_output_files", wf)
        assert run.state(f"{wf}/transfer/3", lambda e: e.state is State.COMPLETE, 30, "output back").attrs[
            "client_path"] == str(out)
        assert out.read_text() == "HELLO SOMA\n"

    @pytest.mark.timeout(150)
    @pytest.mark.parametrize("recovery", ["resubmit", "reattach"])
    def test_recovered_workflow_moves_its_files(self, soma_session: Session, tmp_path: Path, recovery: str) -> None:
        """After the controller dies, the recovered workflow (resubmitted: new id, inputs copied in again) brings its output back."""
        run = soma_session(recovery=recovery)
        src, out, flag = tmp_path / "in.txt", tmp_path / "out.txt", tmp_path / "flag"
        src.write_text("again\n")
        # first run: leave a flag and hang; the run after recovery copies its input to its output
        script = f'if [ -e "{flag}" ]; then cp "$0" "$1"; exit 0; fi; touch "{flag}"; sleep 60'
        wf = run.call("submit_workflow", {"name": "rec", "jobs": [
            {"name": "a", "command": ["sh", "-c", script, str(src), str(out)], "inputs": [str(src)],
             "outputs": [str(out)]}]})
        run.state(f"{wf}/a", lambda e: e.state is State.ACTIVE, 30, "a running")
        built = run.session._built
        assert built is not None and built.engine is not None
        built.engine.engine_loop.stop_loop()  # the controller dies
        att = run.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, RecoveryAttempted)
                                                and e.key == str(wf)), None), 60, "workflow recovery")
        assert att.action == recovery and att.ok, att.detail
        new_id = int(att.detail.rsplit(" ", 1)[1]) if recovery == "resubmit" else wf
        assert run.final(str(new_id), 90).state is State.COMPLETE
        assert out.read_text() == "again\n"
        back = [e for k, e in latest(run.rec).items() if k.startswith(f"{new_id}/transfer/")]
        assert len(back) == 2 and all(e.state is State.COMPLETE for e in back)

    @pytest.mark.timeout(90)
    def test_output_that_cannot_come_back_is_an_error_event(self, soma_session: Session, tmp_path: Path) -> None:
        """An output whose client directory is now a file: ErrorEvent on the workflow with soma's words; the file stays on soma's side."""
        run = soma_session()
        sub = tmp_path / "sub"
        sub.mkdir()
        out = sub / "out.txt"
        # the job turns the client directory of its own output into a file, then writes the output
        wf = run.call("submit_workflow", {"name": "lost", "jobs": [
            {"name": "a", "command": ["sh", "-c", f'rm -r "{sub}"; touch "{sub}"; echo x > "$0"', str(out)],
             "outputs": [str(out)]}]})
        err = run.rec.wait_for(lambda ev: next((e for e in ev if isinstance(e, ErrorEvent)), None), 60, "ErrorEvent")
        assert err.key == str(wf) and err.operation == "transfer_output_files"
        assert err.message.startswith(f"workflow {wf}: transfer_output_files: soma FileExistsError: ") and \
            f"File exists: '{sub}'" in err.message, err.message
        assert err.observed is Observed.POLL
        assert run.final(str(wf), 30).state is State.COMPLETE
        key = next(k for k in latest(run.rec) if k.startswith(f"{wf}/transfer/"))
        assert latest(run.rec)[key].native != "on both sides"

    @pytest.mark.timeout(60)
    def test_shared_resource_path_needs_a_translation(self, soma_session: Session) -> None:
        """A soma-form workflow with a SharedResourcePath: light mode has no translation, and the error is soma's own."""
        from soma_workflow.client import Job, SharedResourcePath, Workflow

        from flowbus.services.soma._wf import serialize

        run = soma_session()
        wf = Workflow([Job(["cat", SharedResourcePath("a.txt", "ns", "uuid1")], name="a")], name="srp")
        with pytest.raises(BackendRejected) as info:
            run.call("submit_workflow", serialize(wf))
        assert str(info.value) == ("session 's0': submit_workflow: soma JobError: Could not submit workflows or jobs "
                                   "with shared resource path: no translation found in the configuration file.")
        assert run.call("workflows") == {}

    @pytest.mark.timeout(60)
    def test_missing_input_is_rejected_before_submission(self, soma_session: Session, tmp_path: Path) -> None:
        """An input file that does not exist is a BackendRejected naming it; nothing is submitted."""
        run = soma_session()
        spec, src, _mid, _out = files_workflow(tmp_path)
        src.unlink()
        with pytest.raises(BackendRejected, match=f"input file '{src}' does not exist"):
            run.call("submit_workflow", spec)
        assert run.call("workflows") == {}


class TestFileDeclarations:
    """inputs/outputs in a description: checked before anything runs; old descriptions stay valid."""

    def test_old_description_still_valid(self) -> None:
        """A description without files parses with empty inputs and outputs."""
        spec = parse_workflow({"name": "w", "jobs": [{"name": "a", "command": ["true"]}]})
        assert spec.jobs[0].inputs == [] and spec.jobs[0].outputs == []

    @pytest.mark.parametrize(("jobs", "text"), [
        ([{"name": "a", "command": ["true"], "inputs": ["rel.txt"]}], "inputs path 'rel.txt' must be absolute"),
        ([{"name": "a", "command": ["true"], "outputs": ["/o", "/o"]}], "outputs lists a path twice"),
        ([{"name": "a", "command": ["true"], "inputs": ["/f"], "outputs": ["/f"]}], "is both an input and an output"),
        ([{"name": "a", "command": ["true"], "outputs": ["/f"]}, {"name": "b", "command": ["true"], "outputs": ["/f"]}],
         "output '/f' is also written by job 'a'"),
        ([{"name": "a", "command": ["true"], "outputs": ["/f"]}, {"name": "b", "command": ["true"], "inputs": ["/f"]}],
         "reads '/f', which job 'a' writes, but does not come after it"),
    ])
    def test_bad_file_declarations(self, jobs: list[dict[str, Any]], text: str) -> None:
        """Each bad declaration is a BackendRejected naming the job and the path."""
        with pytest.raises(BackendRejected, match=text.replace("(", r"\(")):
            parse_workflow({"name": "w", "jobs": jobs})

    def test_reader_after_writer_through_a_chain(self) -> None:
        """A reader that comes after the writer through another job is accepted."""
        parse_workflow({"name": "w", "jobs": [
            {"name": "a", "command": ["true"], "outputs": ["/f"]},
            {"name": "b", "command": ["true"], "after": ["a"]},
            {"name": "c", "command": ["true"], "after": ["b"], "inputs": ["/f"]}]})


def slow_then(flag: Path) -> dict[str, Any]:
    """``slow`` sleeps 30 s unless ``flag`` exists; ``after`` runs when it succeeded."""
    return {"name": "ctl", "jobs": [{"name": "slow", "command": ["bash", "-c", f"test -e {flag} || sleep 30"]},
                                    {"name": "after", "command": ["true"], "after": ["slow"]}]}


class TestJobControl:
    """stop_jobs and restart_jobs act on single jobs of a running workflow."""

    @pytest.mark.timeout(90)
    def test_stop_jobs(self, soma_session: Session, tmp_path: Path) -> None:
        """A running job stopped by stop_jobs is CANCELLED (killed_by_user); the job after it never runs."""
        run = soma_session()
        wf = run.call("submit_workflow", slow_then(tmp_path / "flag"))
        ids = run.call("job_ids", wf)
        run.state(f"{wf}/slow", lambda e: e.native == "running", 30, "slow running")
        assert run.call("stop_jobs", wf, [ids["slow"]]) is True
        slow = run.final(f"{wf}/slow", 30)
        assert (slow.state, slow.native, slow.attrs["exit_status"]) == (State.CANCELLED, "failed", "killed_by_user")
        assert run.final(f"{wf}/after", 30).attrs["exit_status"] == "aborted_before_running"
        assert run.final(str(wf), 30).state is State.CANCELLED

    @pytest.mark.timeout(90)
    def test_restart_jobs(self, soma_session: Session, tmp_path: Path) -> None:
        """restart_jobs kills a running job of a workflow in progress and runs it again (and what follows it)."""
        run = soma_session()
        flag, hold = tmp_path / "flag", tmp_path / "hold"
        spec = slow_then(flag)
        # soma restarts jobs only while their workflow is in progress: a second job keeps it so
        spec["jobs"].append({"name": "hold", "command": ["bash", "-c", f"while [ ! -e {hold} ]; do sleep 0.05; done"]})
        wf = run.call("submit_workflow", spec)
        ids = run.call("job_ids", wf)
        run.state(f"{wf}/slow", lambda e: e.native == "running", 30, "slow running")
        flag.touch()
        assert run.call("restart_jobs", wf, [ids["slow"]]) is True
        # the first run sleeps 30 s: success within 20 s is the second run (with the flag)
        slow = run.state(f"{wf}/slow", lambda e: e.state is State.COMPLETE, 20, "slow run again")
        assert (slow.attrs["exit_status"], slow.attrs["exit_value"]) == ("finished_regularly", 0)
        run.state(f"{wf}/after", lambda e: e.state is State.COMPLETE, 60, "after run")
        hold.touch()
        assert run.final(str(wf), 60).state is State.COMPLETE


class TestDocsExamples:
    """The examples of docs/backends/soma.md run."""

    PAGE = Path(__file__).resolve().parents[3] / "docs" / "backends" / "soma.md"

    def block(self, lang: str) -> str:
        text = self.PAGE.read_text(encoding="utf-8")
        return text.split(f"```{lang}\n", 1)[1].split("```", 1)[0]

    def test_config_example_loads(self) -> None:
        """The TOML example is a valid soma session configuration."""
        cfg = parse_config(tomllib.loads(self.block("toml")))
        s = cfg.sessions[0]
        assert isinstance(s, SomaSessionConfig) and s.directory == "/data/soma" and s.recovery == "reattach"

    @pytest.mark.timeout(120)
    def test_files_example_runs(self, soma_session: Session, tmp_path: Path) -> None:
        """The description with inputs and outputs runs end to end (its /data/ paths moved under a temporary directory)."""
        run = soma_session()
        (tmp_path / "in.txt").write_text("from the docs\n")
        wf = run.call("submit_workflow", self.block("json").replace("/data/", f"{tmp_path}/"))
        assert run.final(str(wf), 60).state is State.COMPLETE
        assert (tmp_path / "out.txt").read_text() == "FROM THE DOCS\n"
