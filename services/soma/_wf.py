"""Workflows in and states out for :class:`~flowbus.services.soma.SomaSession`.

In: a flowbus :class:`~flowbus.schemas.WorkflowSpec` (``{"name", "jobs": [{"name", "command",
"after", "env", "cwd", "inputs", "outputs"}]}``; each input or output path is one
``FileTransfer``) or soma's own JSON form (what ``Helper.serialize`` writes and
``Workflow.from_dict`` reads) becomes a soma ``Workflow``.

Out: ``workflow_elements_status`` snapshots become ``StateChanged`` events. Keys are
``<workflow id>`` and ``<workflow id>/<job name>`` (``<job name>#<job id>`` when a soma workflow
repeats a name). soma calls a job that exited non-zero ``done``: the normalised state is ABORTED
and the exit information travels in ``attrs`` (``exit_status``, ``exit_value``, ``signal``).
A ``done``/``failed`` job whose exit information is not written yet is held back: no final state
is published before soma wrote why the job ended.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import soma_workflow.constants as C  # noqa: N812 - C.DONE, C.FAILED: constants, named like them
from soma_workflow import utils as soma_utils
from soma_workflow.client import FileTransfer, Job, Workflow

from flowbus.schemas import BackendRejected, Event, Observed, State, StateChanged, WorkflowSpec, parse_workflow

from ._engine import soma_message

Scalar = str | int | float | bool | None

#: job status -> normalised state, for statuses that do not need the exit information
_JOB = {
    C.NOT_SUBMITTED: State.QUEUED,
    C.SUBMISSION_PENDING: State.QUEUED,
    C.UNDETERMINED: State.SUBMITTED,
    C.QUEUED_ACTIVE: State.SUBMITTED,
    C.RUNNING: State.ACTIVE,
    C.SYSTEM_ON_HOLD: State.SUSPENDED,
    C.USER_ON_HOLD: State.SUSPENDED,
    C.USER_SYSTEM_ON_HOLD: State.SUSPENDED,
    C.SYSTEM_SUSPENDED: State.SUSPENDED,
    C.USER_SUSPENDED: State.SUSPENDED,
    C.USER_SYSTEM_SUSPENDED: State.SUSPENDED,
    C.KILL_PENDING: State.ACTIVE,
    C.DELETE_PENDING: State.ACTIVE,
    C.WARNING: State.UNKNOWN,
}
_WF = {
    C.WORKFLOW_NOT_STARTED: State.QUEUED,
    C.WORKFLOW_IN_PROGRESS: State.ACTIVE,
    C.KILL_PENDING: State.ACTIVE,
    C.DELETE_PENDING: State.ACTIVE,
    C.WARNING: State.UNKNOWN,
}


# -- in ------------------------------------------------------------------------------------------


def from_spec(spec: WorkflowSpec) -> Workflow:
    """A soma ``Workflow`` for a validated flowbus description. Each path a job lists in
    ``inputs`` / ``outputs`` becomes one soma ``FileTransfer`` (an input when no job writes it),
    referenced by the jobs that read or write it; a command argument equal to the path is that
    ``FileTransfer`` (soma puts the file's path where the job runs in its place)."""
    written = {p for j in spec.jobs for p in j.outputs}
    files: dict[str, FileTransfer] = {}
    for j in spec.jobs:
        for path in [*j.inputs, *j.outputs]:
            if path not in files:
                files[path] = FileTransfer(path not in written, path, name=os.path.basename(path) or "file")
    jobs: dict[str, Job] = {}
    for j in spec.jobs:
        mine = set(j.inputs) | set(j.outputs)
        command: list[Any] = [files[a] if a in mine else a for a in j.command]
        jobs[j.name] = Job(command=command, name=j.name, env=dict(j.env) or None, working_directory=j.cwd or None,
                           referenced_input_files=[files[p] for p in j.inputs] or None,
                           referenced_output_files=[files[p] for p in j.outputs] or None)
    deps = [(jobs[d], jobs[j.name]) for j in spec.jobs for d in j.after]
    return Workflow(list(jobs.values()), dependencies=deps, name=spec.name)


def to_workflow(data: Any, where: str = "submit_workflow") -> Workflow:
    """A soma ``Workflow`` from a flowbus description or soma's JSON form (dict or JSON text).

    Raises ``BackendRejected`` naming the problem."""
    if isinstance(data, Workflow):
        return data
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise BackendRejected(f"{where}: workflow is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise BackendRejected(f"{where}: workflow must be a mapping or JSON text, got {type(data).__name__}")
    if "serialized_jobs" in data or "root_group" in data:  # soma's own form
        try:
            wf = Workflow.from_dict(soma_utils.from_json(dict(data)))
        except Exception as exc:  # noqa: BLE001  (soma raises anything for a bad dict)
            raise BackendRejected(f"{where}: not a valid soma-workflow workflow dict: "
                                  f"soma {soma_message(exc)}") from None
        if not wf.jobs:
            raise BackendRejected(f"{where}: soma workflow {wf.name!r} has no jobs")
        for j in wf.jobs:
            if not getattr(j, "command", None) and not type(j).__name__.endswith(("BarrierJob", "EngineExecutionJob")):
                raise BackendRejected(f"{where}: soma workflow {wf.name!r}: job {j.name!r} has an empty command")
        return wf
    return from_spec(parse_workflow(data, where))


def has_files(wf: Workflow) -> tuple[bool, bool]:
    """Whether jobs of ``wf`` reference (input files, output files)."""
    jobs = getattr(wf, "jobs", None) or []
    return (any(getattr(j, "referenced_input_files", None) for j in jobs),
            any(getattr(j, "referenced_output_files", None) for j in jobs))


def serialize(wf: Workflow) -> dict[str, Any]:
    """soma's JSON form of a workflow (what ``Helper.serialize`` writes), as plain data."""
    out: dict[str, Any] = json.loads(json.dumps(soma_utils.to_json(wf.to_dict()), default=str))
    return out


# -- plain results -------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """msgpack-ready copy: datetimes as ISO text, tuples as lists, keys as text, soma objects
    as their dict form."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Workflow):
        return serialize(value)
    if hasattr(value, "to_dict"):
        try:
            return plain(value.to_dict())
        except Exception:  # noqa: BLE001, S110 - fall back to the text form
            pass
    return str(value)


# -- out -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obs:
    """One resource as last observed (what a StateChanged carries)."""

    state: State
    native: str
    attrs: tuple[tuple[str, Scalar], ...] = ()
    detail: str = ""

    def same(self, other: Obs | None) -> bool:
        return other is not None and (self.state, self.native, self.attrs) == (other.state, other.native, other.attrs)


def job_state(status: str, exit_info: Any) -> tuple[State | None, str]:
    """(normalised state, detail) of a job; state None = not final yet (exit info pending)."""
    if status in (C.DONE, C.FAILED):
        exit_status, exit_value, signal = [*(exit_info or ()), None, None, None][:3]
        if exit_status is None:
            return None, "exit information not written yet"
        if exit_status == C.FINISHED_REGULARLY:
            if exit_value == 0:
                return State.COMPLETE, ""
            return State.ABORTED, f"exit value {exit_value}"
        if exit_status == C.FINISHED_TERM_SIG:
            return State.ABORTED, f"killed by signal {signal}"
        if exit_status in (C.USER_KILLED, C.EXIT_NOTRUN):
            return State.CANCELLED, str(exit_status)
        return State.ABORTED, str(exit_status)
    return _JOB.get(status, State.UNKNOWN), ""


def job_attrs(job_id: int, exit_info: Any, drmaa_id: Any) -> tuple[tuple[str, Scalar], ...]:
    exit_status, exit_value, signal = [*(exit_info or ()), None, None, None][:3]
    return (("job_id", int(job_id)), ("exit_status", exit_status), ("exit_value", exit_value),
            ("signal", None if signal is None else str(signal)),
            ("drmaa_id", None if drmaa_id is None else str(drmaa_id)))


@dataclass
class WfSnap:
    """One read of a workflow: its own observation and its jobs' (by key)."""

    wf_id: int
    status: str
    resources: dict[str, Obs] = field(default_factory=dict)
    #: keys held back (done/failed without exit information)
    pending: set[str] = field(default_factory=set)
    #: the workflow's file transfers as soma lists them (see :mod:`._transfers`)
    transfers: Any = ()

    @property
    def settled(self) -> bool:
        """Done and every job's exit information written: nothing will change by itself."""
        return self.status == C.WORKFLOW_DONE and not self.pending


def read_workflow(wc: Any, wf_id: int, names: Mapping[int, str]) -> WfSnap:
    """``workflow_elements_status`` as observations (``names``: soma job id -> key suffix)."""
    jobs, transfers, status, _date, _tmp = wc.workflow_elements_status(wf_id)[:5]
    snap = WfSnap(wf_id, str(status), transfers=transfers)
    states: list[State] = []
    for row in jobs:
        job_id, jstatus, _queue, exit_info, _dates = row[:5]
        drmaa_id = row[5] if len(row) > 5 else None
        key = f"{wf_id}/{names.get(int(job_id), str(job_id))}"
        state, detail = job_state(str(jstatus), exit_info)
        if state is None:
            snap.pending.add(key)
            continue
        states.append(state)
        snap.resources[key] = Obs(state, str(jstatus), job_attrs(job_id, exit_info, drmaa_id), detail)
    if status == C.WORKFLOW_DONE and not snap.pending:
        wstate = State.COMPLETE
        if State.ABORTED in states:
            wstate = State.ABORTED
        elif State.CANCELLED in states:
            wstate = State.CANCELLED
    elif status == C.WORKFLOW_DONE:
        wstate = State.ACTIVE  # some exit information is still being written
    else:
        wstate = _WF.get(str(status), State.UNKNOWN)
    failed = sum(1 for s in states if s in (State.ABORTED, State.CANCELLED))
    snap.resources[str(wf_id)] = Obs(wstate, str(status), (("workflow_id", int(wf_id)), ("jobs", len(jobs)),
                                                           ("failed", failed)))
    return snap


def job_names(wc: Any, wf_id: int) -> dict[int, str]:
    """soma job id -> key suffix (the job name; ``name#id`` where a name repeats)."""
    ewf = wc.workflow(wf_id)
    pairs = [(int(ej.job_id), str(ej.name)) for ej in ewf.job_mapping.values()]
    counts: dict[str, int] = {}
    for _, n in pairs:
        counts[n] = counts.get(n, 0) + 1
    return {jid: (n if counts[n] == 1 and "/" not in n else f"{n.replace('/', '_')}#{jid}") for jid, n in pairs}


class Tracker:
    """The last published observation per key, and the diff that makes events."""

    def __init__(self, source: str, backend: str) -> None:
        self.source = source
        self.backend = backend
        self.last: dict[str, Obs] = {}

    def seed(self, known: Mapping[str, Event]) -> None:
        for key, ev in known.items():
            if isinstance(ev, StateChanged):
                self.last[ev.key or key] = Obs(ev.state, ev.native, tuple(ev.attrs.items()), ev.detail)

    def diff(self, snap: Mapping[str, Obs], observed: Observed) -> list[StateChanged]:
        out: list[StateChanged] = []
        for key, obs in snap.items():
            prev = self.last.get(key)
            if obs.same(prev):
                continue
            out.append(StateChanged(source=self.source, backend=self.backend, key=key, observed=observed,
                                    state=obs.state, native=obs.native, detail=obs.detail, attrs=dict(obs.attrs),
                                    previous=None if prev is None else prev.state,
                                    native_previous="" if prev is None else prev.native))
            self.last[key] = obs
        return out

    def gone(self, keys: list[str], observed: Observed, detail: str) -> list[StateChanged]:
        """Keys that no longer exist: UNKNOWN with ``native=""`` (once)."""
        snap = {k: Obs(State.UNKNOWN, "", (), detail) for k in keys
                if not (self.last.get(k) is not None and self.last[k].native == ""
                        and self.last[k].state is State.UNKNOWN)}
        return self.diff(snap, observed)

    def keys_of(self, wf_id: int) -> list[str]:
        prefix = f"{wf_id}/"
        return [k for k in self.last if k == str(wf_id) or k.startswith(prefix)]


def from_record(record: Mapping[str, Any]) -> Workflow:
    """The workflow a :func:`serialize` record describes."""
    return Workflow.from_dict(soma_utils.from_json(dict(record)))


__all__ = ["Obs", "Tracker", "WfSnap", "from_record", "has_files", "job_names", "job_state", "plain", "read_workflow",
           "serialize", "to_workflow"]
