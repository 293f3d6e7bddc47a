"""The operations a :class:`~flowbus.services.wms.WmsSession` runs through ``call()``: one
function per operation, named as the operation, declared with ``@OPS.op``.

Raw ``BaseWmsService`` methods keep their names and arguments; results are converted to plain
data. A method the service does not implement (``NotImplementedError`` or absent) raises
``UnknownOperation("<op> is not supported by <class path>")``. As BPS does, ``prepare``,
``submit``, ``list_submitted_jobs`` and ``run_submission_checks`` use the service built from the
session's BpsConfig, and ``report``, ``get_status``, ``cancel``, ``ping`` and ``restart`` one
built from ``{}``.

No operation can break the session itself: the service objects are rebuilt on every reconnect,
Parsl is loaded and unloaded per run, and a ``bps_config`` that would change the service class
or the submit path the session observes through is refused (``BackendRejected``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flowbus.schemas import BackendError, BackendRejected, Observed, UnknownOperation, parse_workflow

from .._ops import Operations
from ._build import base_config, check_session_keys, generic_workflow, new_submit_path, parsl_guard
from ._errors import wms_errors
from ._model import JOB, WORKFLOW, changed, job_key, plain
from ._parsl import ParslRun

if TYPE_CHECKING:
    from ._session import WmsSession

OPS: Operations[WmsSession] = Operations("wms")


# -- workflows ------------------------------------------------------------------------------------

@OPS.op
def submit_workflow(session: WmsSession, description: Any,
                    bps_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build a GenericWorkflow from a flowbus description, prepare and submit it.

    Returns ``{"wms_id", "name", "submit_path"}`` at once; a Parsl workflow then runs on a
    runner thread (queued behind any other Parsl workflow of this process)."""
    session._require_up("submit_workflow")
    prepared = prepare(session, description, bps_config)
    return submit(session, prepared["wms_id"])


@OPS.op
def prepare(session: WmsSession, description: Any, bps_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``service.prepare`` of a description (``{"name", "jobs": [...]}``, see WorkflowSpec);
    the id to pass to ``submit`` is the new submit path."""
    session._require_up("prepare")
    spec = parse_workflow(description, "prepare")
    if bps_config is not None:
        if not isinstance(bps_config, Mapping):
            raise BackendRejected(f"prepare: bps_config must be a table, not {type(bps_config).__name__}")
        check_session_keys(bps_config, "prepare", session.name, session.class_path)
    with wms_errors("prepare", session.class_path):
        path = new_submit_path(session._root, spec.name)
        gw = generic_workflow(spec)
        config = base_config(session.config, path, bps_config, parsl_guard(path) if session.is_parsl else "")
    if {**session.config.bps_config, **(bps_config or {})}.get("runWmsSubmissionChecks", True):
        # as BPS: the plugin's checks first, on a service built from this submission's config
        cls = session._cls
        assert cls is not None  # set by the first open, before the session is UP
        with wms_errors("prepare", session.class_path):
            service = cls(config)
        _submission_checks(session, service, "prepare")
    wf = session._svc_call(session._service, "prepare", config, gw, out_prefix=path)
    with session._lock:
        session._prepared[path] = wf
        if session.is_parsl:
            tracker = session._tracker
            session._publish(changed(
                [tracker.observe(path, "READY", WORKFLOW, path, spec.name, Observed.POLL)]
                + [tracker.observe(job_key(path, j.name), "UNREADY", JOB, path, j.name, Observed.POLL)
                   for j in spec.order()]))
    return {"wms_id": path, "name": spec.name, "submit_path": path}


@OPS.op
def submit(session: WmsSession, wms_id: str, **kwargs: Any) -> dict[str, Any]:
    """``service.submit`` of a prepared workflow (by the id ``prepare`` returned)."""
    session._require_up("submit")
    with session._lock:
        wf = session._prepared.pop(str(wms_id), None)
    if wf is None:
        raise BackendRejected(f"submit: no prepared workflow {wms_id!r} in session {session.name!r}")
    path = str(wms_id)
    if session.is_parsl:
        run = ParslRun(session._service, wf, path)
        with session._lock:
            session._track(run)
            run.start()
            session._observe_run(run, Observed.POLL)
        return {"wms_id": path, "name": run.name, "submit_path": path}
    session._svc_call(session._service, "submit", wf, **kwargs)
    new_id = str(getattr(wf, "run_id", None) or path)
    _follow(session, new_id, str(getattr(wf, "name", "")))
    return {"wms_id": new_id, "name": str(getattr(wf, "name", "")), "submit_path": path}


@OPS.op
def restart(session: WmsSession, wms_id: str) -> dict[str, Any]:
    """Re-run only the failed and pruned jobs. Parsl: by submit path, in the background
    (the id stays the same); other services: ``service.restart`` (its new id is watched)."""
    session._require_up("restart")
    wms_id = str(wms_id)
    if session.is_parsl:
        return _restart_parsl(session, wms_id)
    new_id, run_name, message = session._svc_call(session._query, "restart", wms_id)
    if not new_id:
        raise BackendRejected(f"restart {wms_id!r}: {message or 'refused by ' + session.class_path}")
    _follow(session, str(new_id), str(run_name or ""))
    return {"wms_id": str(new_id), "name": str(run_name or ""), "message": str(message or "")}


def _restart_parsl(session: WmsSession, wms_id: str) -> dict[str, Any]:
    from lsst.ctrl.bps.parsl.configuration import get_workflow_filename
    from lsst.ctrl.bps.parsl.workflow import ParslWorkflow

    with session._lock:
        active = session._runs.get(wms_id)
        if active is not None:
            raise BackendRejected(f"restart {wms_id!r}: the workflow is still {active.phase}")
    if not os.path.isfile(get_workflow_filename(wms_id)):
        raise BackendRejected(f"restart {wms_id!r}: not a Parsl submit path (no {get_workflow_filename(wms_id)})")
    with wms_errors("restart", session.class_path):
        wf = ParslWorkflow.read(wms_id)
    with session._lock:
        done = {s.name for s in session._tracker.jobs_of(wms_id).values() if s.native == "SUCCEEDED"}
        run = ParslRun(session._service, wf, wms_id, mode="restart", done_before=done)
        session._track(run)
        run.start()
        session._observe_run(run, Observed.POLL)
    return {"wms_id": wms_id, "name": run.name, "message": ""}


@OPS.op
def cancel(session: WmsSession, wms_id: str, pass_thru: str | None = None) -> dict[str, Any]:
    """Parsl (this session's runs): jobs not started never run, running jobs are signalled;
    other services: ``service.cancel``. Returns ``{"ok", "message"}``."""
    session._require_up("cancel")
    wms_id = str(wms_id)
    with session._lock:
        run = session._runs.get(wms_id)
    if run is not None and run.cancel():
        with session._lock:
            if session._runs.get(wms_id) is run:
                session._observe_run(run, Observed.POLL)
        return {"ok": True, "message": f"cancelled {wms_id}"}
    if session.is_parsl:
        seen = session._tracker.seen.get(wms_id)
        if seen is None:
            raise BackendRejected(f"cancel: unknown workflow {wms_id!r} in session {session.name!r}")
        return {"ok": False, "message": f"{wms_id} is not running (state {seen.native})"}
    ok, message = session._svc_call(session._query, "cancel", wms_id, pass_thru=pass_thru)
    if ok and session._has_report:
        with session._lock:
            session._report_run(wms_id, Observed.POLL)
    return {"ok": bool(ok), "message": str(message or "")}


def _follow(session: WmsSession, wms_id: str, name: str) -> None:
    """Watch a run through report(); a service without report() gets one SUBMITTED state."""
    with session._lock:
        if session._has_report:
            session._watched[wms_id] = False
            session._report_run(wms_id, Observed.POLL)
        else:
            session._publish(changed([session._tracker.observe(
                wms_id, "PENDING", WORKFLOW, wms_id, name, Observed.POLL,
                f"submitted; {session.class_path} has no report(): no further states")]))


# -- queries --------------------------------------------------------------------------------------

@OPS.op
def report(session: WmsSession, wms_id: str | None = None, user: str | None = None, hist: float = 0,
           pass_thru: str | None = None, is_global: bool = False, return_exit_codes: bool = False) -> dict[str, Any]:
    """``service.report``: ``{"runs": [WmsRunReport as dicts], "message"}``."""
    session._require_up("report")
    runs, message = session._svc_call(session._query, "report", wms_workflow_id=wms_id, user=user, hist=hist,
                                      pass_thru=pass_thru, is_global=is_global,
                                      return_exit_codes=return_exit_codes)
    return {"runs": plain(list(runs or [])), "message": str(message or "")}


@OPS.op
def get_status(session: WmsSession, wms_id: str, hist: float = 1, is_global: bool = False) -> dict[str, Any]:
    session._require_up("get_status")
    state, message = session._svc_call(session._query, "get_status", wms_id, hist=hist, is_global=is_global)
    return {"state": plain(state), "message": str(message or "")}


@OPS.op
def list_submitted_jobs(session: WmsSession, wms_id: str | None = None, user: str | None = None,
                        require_bps: bool = True, pass_thru: str | None = None,
                        is_global: bool = False) -> list[Any]:
    session._require_up("list_submitted_jobs")
    return list(plain(session._svc_call(session._service, "list_submitted_jobs", wms_id=wms_id, user=user,
                                        require_bps=require_bps, pass_thru=pass_thru, is_global=is_global) or []))


@OPS.op
def ping(session: WmsSession, pass_thru: str | None = None) -> dict[str, Any]:
    session._require_up("ping")
    status, message = session._svc_call(session._query, "ping", pass_thru)
    return {"status": int(status), "message": str(message or "")}


@OPS.op
def run_submission_checks(session: WmsSession) -> dict[str, Any]:
    """The service's own checks, as BPS runs them before a submission: ``{"ok": True, "checked":
    False}`` when the plugin has none (BPS skips them), ``BackendRejected`` naming why when they
    fail (BPS halts the submission)."""
    session._require_up("run_submission_checks")
    return _submission_checks(session, session._service, "run_submission_checks")


def _submission_checks(session: WmsSession, service: Any, operation: str) -> dict[str, Any]:
    try:
        session._svc_call(service, "run_submission_checks")
    except UnknownOperation:
        return {"ok": True, "checked": False,
                "detail": f"{session.class_path} has no submission checks (BPS skips them)"}
    except BackendError as exc:
        raise BackendRejected(f"{operation}: the submission checks of {session.class_path} failed: {exc}") from exc
    return {"ok": True, "checked": True, "detail": ""}


@OPS.op
def status(session: WmsSession, wms_id: str | None = None) -> Any:
    """The session's own view (works for every service, Parsl included):
    ``{"wms_id", "name", "state", "detail", "jobs": {name: WmsStates name}}``, or a list of
    them for every workflow it knows when ``wms_id`` is omitted."""
    session._require_up("status")
    with session._lock:
        tracker = session._tracker
        if wms_id is None:
            return [tracker.view(k) for k in sorted(tracker.workflows())]
        if str(wms_id) not in tracker.seen:
            raise BackendRejected(f"status: unknown workflow {wms_id!r} in session {session.name!r}")
        return tracker.view(str(wms_id))


@OPS.op
def watch(session: WmsSession, wms_id: str) -> dict[str, Any]:
    """Follow a run submitted elsewhere (``bps submit``) through ``report()`` polling."""
    session._require_up("watch")
    if not session._has_report:
        raise UnknownOperation(f"watch is not supported by {session.class_path} (it has no report())")
    wms_id = str(wms_id)
    with session._lock:
        session._watched[wms_id] = False
        session._report_run(wms_id, Observed.POLL)
        return session._tracker.view(wms_id)


__all__ = ["OPS"]
