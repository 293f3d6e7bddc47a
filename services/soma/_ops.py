"""The operations a :class:`~flowbus.services.soma.SomaSession` runs through ``call()``: every
``WorkflowController`` method and the ``Helper`` functions, one function per operation, named as
the operation and declared with ``@OPS.op``. Arguments are checked first; soma's exceptions
become flowbus ones in :meth:`SomaSession._using` (see :func:`soma_errors_to_flowbus`). Results
are plain data (see :func:`~._wf.plain`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import soma_workflow.constants as C  # noqa: N812 - soma's constants module, named like them
import soma_workflow.errors as soma_errors
from soma_workflow.client import FileTransfer, Helper
from soma_workflow.engine_types import EngineTransfer

from flowbus.schemas import BackendError, BackendProtocolError, BackendRejected, BackendUnavailable

from .._ops import Operations
from ._engine import quiet, soma_message
from ._wf import has_files, job_names, plain, to_workflow
from ._wf import serialize as soma_form

if TYPE_CHECKING:
    from ._session import SomaSession

OPS: Operations[SomaSession] = Operations("soma")

#: longest wait_workflow / wait_job a call may ask for (a call holds a thread of the host)
MAX_WAIT_S = 3600.0

_ERRORS: Mapping[type[BaseException], type[BackendError]] = {
    soma_errors.UnknownObjectError: BackendRejected,
    soma_errors.WorkflowError: BackendRejected,
    soma_errors.JobError: BackendRejected,
    soma_errors.TransferError: BackendRejected,
    soma_errors.SerializationError: BackendRejected,
    soma_errors.EngineError: BackendUnavailable,
    soma_errors.DatabaseError: BackendUnavailable,
    soma_errors.ConnectionError: BackendUnavailable,
    soma_errors.DRMError: BackendUnavailable,
    TypeError: BackendRejected,
    ValueError: BackendRejected,
    KeyError: BackendRejected,
    FileNotFoundError: BackendRejected,  # a client file a transfer names is missing
    PermissionError: BackendRejected,
    OSError: BackendUnavailable,
}


@contextlib.contextmanager
def soma_errors_to_flowbus(operation: str) -> Iterator[None]:
    """soma's exceptions as flowbus ones, each carrying soma's message (original chained)."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        dst = next((d for src, d in _ERRORS.items() if isinstance(exc, src)), BackendProtocolError)
        raise dst(f"{operation}: soma {soma_message(exc)}") from exc


def _id(value: Any, what: str, operation: str) -> int:
    """An integer id; a workflow id may also be an event key (``"7"`` or ``"7/<job>"``), a
    transfer id too (``"transfer/3"``, ``"7/transfer/3"``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if what == "transfer_id" and isinstance(value, str) and "transfer/" in value \
                and value.rsplit("/", 1)[1].isdigit():
            return int(value.rsplit("/", 1)[1])
        if what == "workflow_id" and isinstance(value, str) and value.split("/", 1)[0].isdigit():
            return int(value.split("/", 1)[0])
        raise BackendRejected(f"{operation}: {what} must be an integer id, got {value!r}")
    return value


def _ids(values: Any, what: str, operation: str) -> list[int]:
    if isinstance(values, (int, str)) and not isinstance(values, bool):
        return [_id(values, what, operation)]
    if not isinstance(values, (list, tuple)):
        raise BackendRejected(f"{operation}: {what} must be a list of integer ids, got {values!r}")
    return [_id(v, what, operation) for v in values]


def _timeout(value: Any, operation: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_WAIT_S:
        raise BackendRejected(f"{operation}: timeout must be a number of seconds in [0, {MAX_WAIT_S:g}], got {value!r}"
                              " (soma's 'wait forever' would hold a host thread)")
    return float(value)


def _checked(session: SomaSession, workflow_id: Any, operation: str) -> int:
    """A workflow id checked against the controller (unknown ids: ``BackendRejected``)."""
    wf_id = _id(workflow_id, "workflow_id", operation)
    with session._using(operation) as wc:
        wc.workflow_status(wf_id)  # raises UnknownObjectError naming the id
    return wf_id


# -- submission --------------------------------------------------------------------------------

@OPS.op
def submit_workflow(session: SomaSession, workflow: Any, expiration_date: str | None = None, name: str | None = None,
                    queue: str | None = None, transfer: bool = True) -> int:
    """Submit a flowbus ``WorkflowSpec`` dict/JSON or soma's JSON form; returns the workflow id.

    With ``transfer`` (the default) the session moves the files the jobs reference: the input
    files right after submission (each must exist), the output files once the workflow is done
    (at the poll that sees it done). Without it, ``transfer_input_files`` /
    ``transfer_output_files`` / ``transfer_files`` are the caller's to call, as in soma."""
    wf = to_workflow(workflow, "submit_workflow")
    expires = _date(expiration_date, "submit_workflow") if expiration_date is not None else None
    if name is not None and not isinstance(name, str):
        raise BackendRejected(f"submit_workflow: name must be a str, got {name!r}")
    inputs, outputs = has_files(wf) if transfer else (False, False)
    if inputs:
        for ft in {id(f): f for j in wf.jobs for f in (j.referenced_input_files or ())}.values():
            path = getattr(ft, "client_path", None)
            if getattr(ft, "initial_status", None) == C.FILES_ON_CLIENT and path and not os.access(path, os.R_OK):
                raise BackendRejected(f"submit_workflow: input file {path!r} does not exist or cannot be read")
    record = soma_form(wf)
    with session._using("submit_workflow") as wc:
        wf_id = int(wc.submit_workflow(wf, expiration_date=expires, name=name or wf.name, queue=queue))
    session._submitted(wf_id, record, transfer=bool(transfer), outputs=outputs)
    if inputs:
        try:
            with session._using("submit_workflow") as wc, quiet():  # soma prints warnings
                Helper.transfer_input_files(wf_id, wc)
        except BackendError as exc:
            exc.args = (f"{exc} (workflow {wf_id} was submitted; its jobs wait for their input files: "
                        f"transfer_input_files({wf_id}) tries again)", *exc.args[1:])
            raise
        finally:
            session._transfers_changed([wf_id])
    return wf_id


@OPS.op
def submit(session: SomaSession, workflow: Any, name: str | None = None) -> int:
    """``submit_workflow`` that also takes the path of a JSON file (a flowbus description or
    soma's form, as ``Helper.serialize`` writes it); the rules' ``submit`` action."""
    if isinstance(workflow, str) and not workflow.lstrip().startswith("{"):
        try:
            with open(os.path.expanduser(workflow)) as f:
                workflow = f.read()
        except OSError as exc:
            raise BackendRejected(f"submit: cannot read workflow file {workflow!r}: {exc.strerror}") from None
    return submit_workflow(session, workflow, name=name)


@OPS.op
def register_transfer(session: SomaSession, is_input: bool, client_path: str | None = None, disposal_timeout: int = 168,
                      name: str | None = None, client_paths: list[str] | None = None) -> dict[str, Any]:
    """Register a ``FileTransfer``; returns its id (what the other transfer operations take) and
    paths. Its states are published under ``transfer/<id>``."""
    if not isinstance(is_input, bool) or (client_path is None and not client_paths):
        raise BackendRejected("register_transfer: needs is_input (bool) and client_path or client_paths")
    paths: list[Any] = ([*client_paths] if client_paths else [client_path]) if is_input else []
    for path in paths:
        if not isinstance(path, str) or not os.path.exists(path):
            raise BackendRejected(f"register_transfer: input file {path!r} does not exist")
    if isinstance(disposal_timeout, bool) or not isinstance(disposal_timeout, int) or disposal_timeout <= 0:
        raise BackendRejected(f"register_transfer: disposal_timeout must be a positive number of hours, "
                              f"got {disposal_timeout!r}")
    with session._using("register_transfer") as wc:
        ft = FileTransfer(is_input, client_path, disposal_timeout, name, client_paths)
        eng = getattr(wc, "_engine_proxy", None)
        if eng is not None and hasattr(eng, "_database_server"):
            # soma 6.0.13's EngineTransfer reads ``disposal_timeout`` (always None) where
            # FileTransfer stored ``_disposal_timeout``: do what WorkflowEngine.register_transfer
            # does, with the expiration date given
            expires = datetime.datetime.now() + datetime.timedelta(hours=disposal_timeout)
            et = eng._database_server.add_transfer(EngineTransfer(ft), eng._user_id, expires)
            if et.client_paths:
                os.mkdir(et.engine_path)
        else:
            et = wc.register_transfer(ft)
        out = {"transfer_id": plain(getattr(et, "transfer_id", None)), "engine_path": plain(et.engine_path),
               "client_path": plain(et.client_path), "client_paths": plain(et.client_paths),
               "status": plain(getattr(et, "status", None))}
    session._transfers_changed()
    return out


# -- retrieval ---------------------------------------------------------------------------------

@OPS.op
def workflow(session: SomaSession, workflow_id: int) -> dict[str, Any]:
    """The workflow: id, name, status, jobs (id, name, command), dependencies (by job id),
    and soma's JSON form."""
    wf_id = _id(workflow_id, "workflow_id", "workflow")
    with session._using("workflow") as wc:
        ewf = wc.workflow(wf_id)
        status = wc.workflow_status(wf_id)
    ids = {id(cj): int(ej.job_id) for cj, ej in ewf.job_mapping.items()}
    jobs = [{"job_id": int(ej.job_id), "name": str(ej.name), "command": plain(getattr(cj, "command", None))}
            for cj, ej in ewf.job_mapping.items()]
    deps = [[ids.get(id(a)), ids.get(id(b))] for a, b in (ewf.dependencies or [])]
    try:
        soma = soma_form(ewf)
    except Exception:  # noqa: BLE001  (the engine form does not always serialise)
        soma = {}
    return {"workflow_id": wf_id, "name": plain(ewf.name), "status": plain(status), "jobs": jobs,
            "dependencies": deps, "soma": soma}


@OPS.op
def job_ids(session: SomaSession, workflow_id: int) -> dict[str, int]:
    """Job name -> soma job id for one workflow (a repeated name gets ``name#id``)."""
    wf_id = _id(workflow_id, "workflow_id", "job_ids")
    with session._using("job_ids") as wc:
        return {n: jid for jid, n in job_names(wc, wf_id).items()}


@OPS.op
def workflows(session: SomaSession, workflow_ids: list[int] | None = None) -> dict[str, Any]:
    ids = None if workflow_ids is None else _ids(workflow_ids, "workflow_ids", "workflows")
    with session._using("workflows") as wc:
        return plain(wc.workflows(ids))  # type: ignore[no-any-return]  # soma is untyped


@OPS.op
def jobs(session: SomaSession, job_ids: list[int] | None = None) -> dict[str, Any]:
    ids = None if job_ids is None else _ids(job_ids, "job_ids", "jobs")
    with session._using("jobs") as wc:
        return plain(wc.jobs(ids))  # type: ignore[no-any-return]  # soma is untyped


@OPS.op
def transfers(session: SomaSession, transfer_ids: list[int] | None = None) -> dict[str, Any]:
    """Transfer id -> (engine path, client path, expiration date, client paths) of the
    transfers registered alone (or of ``transfer_ids``)."""
    ids = None if transfer_ids is None else _ids(transfer_ids, "transfer_id", "transfers")
    with session._using("transfers") as wc:
        return plain(wc.transfers(ids))  # type: ignore[no-any-return]  # soma is untyped


@OPS.op
def workflow_status(session: SomaSession, workflow_id: int) -> str:
    wf_id = _id(workflow_id, "workflow_id", "workflow_status")
    with session._using("workflow_status") as wc:
        return str(wc.workflow_status(wf_id))


@OPS.op
def workflow_elements_status(session: SomaSession, workflow_id: int, with_drms_id: bool = True) -> list[Any]:
    wf_id = _id(workflow_id, "workflow_id", "workflow_elements_status")
    with session._using("workflow_elements_status") as wc:
        # soma is untyped: plain() of its reply is Any
        return plain(wc.workflow_elements_status(wf_id, with_drms_id=bool(with_drms_id)))  # type: ignore[no-any-return]


@OPS.op
def job_status(session: SomaSession, job_id: int) -> str:
    jid = _id(job_id, "job_id", "job_status")
    with session._using("job_status") as wc:
        return str(wc.job_status(jid))


@OPS.op
def job_termination_status(session: SomaSession, job_id: int) -> list[Any]:
    jid = _id(job_id, "job_id", "job_termination_status")
    with session._using("job_termination_status") as wc:
        return plain(wc.job_termination_status(jid))  # type: ignore[no-any-return]  # soma is untyped


@OPS.op
def transfer_status(session: SomaSession, transfer_id: int) -> list[Any]:
    """``[status, progression]`` of a transfer (its id as ``register_transfer`` returns it)."""
    tid = _id(transfer_id, "transfer_id", "transfer_status")
    with session._using("transfer_status") as wc:
        return plain(wc.transfer_status(tid))  # type: ignore[no-any-return]  # soma is untyped


@OPS.op
def retrieve_job_stdouterr(session: SomaSession, job_id: int, max_bytes: int = 1 << 20) -> dict[str, str]:
    """The job's stdout and stderr as text (at most ``max_bytes`` of each, from the end)."""
    jid = _id(job_id, "job_id", "retrieve_job_stdouterr")
    with tempfile.TemporaryDirectory(prefix="flowbus-soma-out-") as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        with session._using("retrieve_job_stdouterr") as wc:
            wc.retrieve_job_stdouterr(jid, out, err)
        return {"stdout": _tail(out, max_bytes), "stderr": _tail(err, max_bytes)}


# -- control -----------------------------------------------------------------------------------

@OPS.op
def stop_workflow(session: SomaSession, workflow_id: int) -> bool:
    wf_id = _checked(session, workflow_id, "stop_workflow")
    with session._using("stop_workflow") as wc:
        return bool(wc.stop_workflow(wf_id))


@OPS.op
def restart_workflow(session: SomaSession, workflow_id: int, queue: str | None = None) -> bool:
    wf_id = _checked(session, workflow_id, "restart_workflow")
    with session._using("restart_workflow") as wc:
        ok = bool(wc.restart_workflow(wf_id, queue))
    session._watch(wf_id)
    return ok


@OPS.op
def delete_workflow(session: SomaSession, workflow_id: int, force: bool = True) -> bool:
    wf_id = _checked(session, workflow_id, "delete_workflow")
    with session._using("delete_workflow") as wc:
        ok = bool(wc.delete_workflow(wf_id, bool(force)))
    session._watch(wf_id)
    return ok


@OPS.op
def stop_jobs(session: SomaSession, workflow_id: int, job_ids: list[int]) -> bool:
    wf_id = _checked(session, workflow_id, "stop_jobs")
    with session._using("stop_jobs") as wc:
        return bool(wc.stop_jobs(wf_id, _ids(job_ids, "job_ids", "stop_jobs")))


@OPS.op
def restart_jobs(session: SomaSession, workflow_id: int, job_ids: list[int]) -> bool:
    wf_id = _checked(session, workflow_id, "restart_jobs")
    with session._using("restart_jobs") as wc, quiet():  # soma prints the job ids
        ok = bool(wc.restart_jobs(wf_id, _ids(job_ids, "job_ids", "restart_jobs")))
    session._watch(wf_id)
    return ok


@OPS.op
def change_workflow_expiration_date(session: SomaSession, workflow_id: int, new_expiration_date: str) -> bool:
    """``new_expiration_date`` as ISO 8601 text (``2030-01-01T00:00:00``)."""
    when = _date(new_expiration_date, "change_workflow_expiration_date")
    wf_id = _checked(session, workflow_id, "change_workflow_expiration_date")
    with session._using("change_workflow_expiration_date") as wc:
        return bool(wc.change_workflow_expiration_date(wf_id, when))


@OPS.op
def wait_workflow(session: SomaSession, workflow_id: int, timeout: float = 60.0) -> str:
    """Soma's own wait (it polls every engine period); returns the workflow status after it."""
    t = _timeout(timeout, "wait_workflow")
    wf_id = _checked(session, workflow_id, "wait_workflow")
    with session._using("wait_workflow") as wc:
        wc.wait_workflow(wf_id, t)
        return str(wc.workflow_status(wf_id))


@OPS.op
def wait_job(session: SomaSession, job_ids: list[int], timeout: float = 60.0) -> dict[str, str]:
    """Soma's own wait on jobs; returns job id -> status after it."""
    ids = _ids(job_ids, "job_ids", "wait_job")
    t = _timeout(timeout, "wait_job")
    with session._using("wait_job") as wc:
        wc.wait_job(ids, t)
        return {str(j): str(wc.job_status(j)) for j in ids}


# -- transfers ---------------------------------------------------------------------------------

@OPS.op
def transfer_files(session: SomaSession, transfer_ids: list[int] | int, buffer_size: int = 512**2) -> None:
    """Copy the files of one transfer or several: inputs to the computing resource, outputs
    back to the client (soma picks the direction from the transfer's status)."""
    ids = _ids(transfer_ids, "transfer_id", "transfer_files")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size <= 0:
        raise BackendRejected(f"transfer_files: buffer_size must be a positive int, got {buffer_size!r}")
    try:
        with session._using("transfer_files") as wc:
            for tid in ids:
                _transferable(wc, tid)
            with quiet():  # soma prints warnings
                wc.transfer_files(ids, buffer_size)
    finally:  # a workflow's transfers are read with it: read every workflow again
        session._transfers_changed(None)


def _transferable(wc: Any, tid: int) -> None:
    """Reject what soma would silently skip (nothing on either side yet) or leave half done (a
    client file that does not exist: soma prints a warning and leaves it 'transfering')."""
    status = wc.transfer_status(tid)[0]
    if status == C.FILES_DO_NOT_EXIST:
        raise BackendRejected(f"transfer_files: transfer {tid} has no file on either side yet (soma status "
                              f"{status!r}: an output is copied back once a job of a workflow wrote it)")
    if status in (C.FILES_ON_CLIENT, C.TRANSFERING_FROM_CLIENT_TO_CR):
        info = [*wc.transfers([tid]).get(tid, ()), None, None, None, None]
        client_path, client_paths = info[1], info[3]
        for path in client_paths or [client_path]:
            if path and not os.path.exists(path):
                raise BackendRejected(f"transfer_files: transfer {tid}: client file {path!r} does not exist")


@OPS.op
def delete_transfer(session: SomaSession, transfer_id: int) -> None:
    """Delete a transfer: soma expires it and disposes of its files once no job needs them; it
    is published as gone (``UNKNOWN``, ``native=""``)."""
    tid = _id(transfer_id, "transfer_id", "delete_transfer")
    with session._using("delete_transfer") as wc:
        wc.delete_transfer(tid)
    session._transfers_changed()


# -- Helper ------------------------------------------------------------------------------------

@OPS.op
def list_failed_jobs(session: SomaSession, workflow_id: int, include_aborted_jobs: bool = False,
                     include_user_killed_jobs: bool = False,
                     include_statuses: list[str] | None = None) -> list[int]:
    wf_id = _checked(session, workflow_id, "list_failed_jobs")
    with session._using("list_failed_jobs") as wc:
        # soma is untyped: plain() of its reply is Any
        return plain(Helper.list_failed_jobs(wf_id, wc, bool(include_aborted_jobs),  # type: ignore[no-any-return]
                                             bool(include_user_killed_jobs), include_statuses))


@OPS.op
def delete_all_workflows(session: SomaSession, force: bool = True) -> bool:
    with session._using("delete_all_workflows") as wc:
        ids = list(wc.workflows())
        ok = bool(Helper.delete_all_workflows(wc, bool(force)))
    for wf_id in ids:
        session._watch(int(wf_id))
    return ok


@OPS.op
def transfer_input_files(session: SomaSession, workflow_id: int, buffer_size: int = 512**2) -> None:
    wf_id = _checked(session, workflow_id, "transfer_input_files")
    try:
        with session._using("transfer_input_files") as wc, quiet():  # soma prints warnings
            Helper.transfer_input_files(wf_id, wc, int(buffer_size))
    finally:
        session._transfers_changed([wf_id])


@OPS.op
def transfer_output_files(session: SomaSession, workflow_id: int, buffer_size: int = 512**2) -> None:
    wf_id = _checked(session, workflow_id, "transfer_output_files")
    try:
        with session._using("transfer_output_files") as wc, quiet():  # soma prints warnings
            Helper.transfer_output_files(wf_id, wc, int(buffer_size))
    finally:
        session._transfers_changed([wf_id])


@OPS.op
def serialize(session: SomaSession, workflow: Any, file_path: str | None = None) -> dict[str, Any]:
    """soma's JSON form of a workflow (flowbus description, soma dict, or a submitted
    workflow's id); with ``file_path`` also written there by ``Helper.serialize``."""
    if isinstance(workflow, int) and not isinstance(workflow, bool):
        with session._using("serialize") as wc:
            wf = wc.workflow(workflow)
    else:
        wf = to_workflow(workflow, "serialize")
    if file_path is not None:
        if not isinstance(file_path, str) or not file_path:
            raise BackendRejected(f"serialize: file_path must be a non-empty str, got {file_path!r}")
        with soma_errors_to_flowbus("serialize"):
            Helper.serialize(file_path, wf)
    return soma_form(wf)


def _date(value: Any, operation: str) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value)
        except ValueError:
            pass
    raise BackendRejected(f"{operation}: expected an ISO 8601 date-time text, got {value!r}")


def _tail(path: str, max_bytes: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - int(max_bytes)))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


__all__ = ["MAX_WAIT_S", "OPS", "soma_errors_to_flowbus", "soma_message"]
