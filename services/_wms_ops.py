"""The operations of a :class:`~flowbus.services.wms.WmsSession` (reached through ``call``).

Raw ``BaseWmsService`` methods keep their names and arguments; results are converted to plain
data. A method the service does not implement (``NotImplementedError`` or absent) raises
``UnknownOperation("<op> is not supported by <class path>")``. As BPS does, ``prepare``,
``submit``, ``list_submitted_jobs`` and ``run_submission_checks`` use the service built from the
session's BpsConfig, and ``report``, ``get_status``, ``cancel``, ``ping`` and ``restart`` one
built from ``{}``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from flowbus.schemas import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Observed,
    UnknownOperation,
    WmsSessionConfig,
    parse_workflow,
)

from ._base import Emit
from ._wms_build import base_config, generic_workflow, new_submit_path, parsl_guard
from ._wms_model import FINAL_NATIVE, JOB, WORKFLOW, Tracker, job_key, plain
from ._wms_parsl import ParslRun, is_parsl_service

OPERATIONS: dict[str, str] = {
    "submit_workflow": "op_submit_workflow",
    "prepare": "op_prepare",
    "submit": "op_submit",
    "report": "op_report",
    "get_status": "op_get_status",
    "list_submitted_jobs": "op_list_submitted_jobs",
    "cancel": "op_cancel",
    "restart": "op_restart",
    "ping": "op_ping",
    "run_submission_checks": "op_run_submission_checks",
    "status": "op_status",
    "watch": "op_watch",
}


@contextlib.contextmanager
def wms_errors(operation: str, class_path: str) -> Iterator[None]:
    """Translate what a WMS service raises; NotImplementedError means "not supported"."""
    try:
        yield
    except BackendError:
        raise
    except NotImplementedError:
        raise UnknownOperation(f"{operation} is not supported by {class_path}") from None
    except (FileNotFoundError, NotADirectoryError, PermissionError, KeyError, ValueError, TypeError,
            ImportError) as exc:
        raise BackendRejected(f"{operation}: {type(exc).__name__}: {exc}") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise BackendUnavailable(f"{operation}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # anything else a plugin raises, named and chained
        raise BackendProtocolError(f"{operation}: {class_path} raised {type(exc).__name__}: {exc}") from exc


class WmsOperations:
    """The operation bodies; :class:`~flowbus.services.wms.WmsSession` adds the lifecycle."""

    config: WmsSessionConfig
    name: str
    _lock: threading.RLock
    _tracker: Tracker
    _emit: Emit | None
    _service: Any
    _query: Any
    _cls: type | None
    _root: str
    _runs: dict[str, ParslRun]
    _prepared: dict[str, Any]
    _watched: dict[str, bool]
    _has_report: bool

    # -- helpers the session provides ------------------------------------------------------------------

    def _require_up(self) -> None:
        raise NotImplementedError

    def _publish(self, events: list[Any]) -> None:
        raise NotImplementedError

    def _observe_run(self, run: ParslRun, observed: Observed) -> None:
        raise NotImplementedError

    def _track(self, run: ParslRun) -> None:
        raise NotImplementedError

    def _report_one(self, wms_id: str, observed: Observed) -> int:
        raise NotImplementedError

    @property
    def class_path(self) -> str:
        return self.config.service_class

    def _svc_call(self, target: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        func = getattr(target, method, None)
        if not callable(func):
            raise UnknownOperation(f"{method} is not supported by {self.class_path}")
        with wms_errors(method, self.class_path):
            return func(*args, **kwargs)

    def _parsl(self) -> bool:
        return self._cls is not None and is_parsl_service(self._cls)

    # -- workflows ------------------------------------------------------------------------------------

    def op_submit_workflow(self, description: Any, bps_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Build a GenericWorkflow from a flowbus description, prepare and submit it.

        Returns ``{"wms_id", "name", "submit_path"}`` at once; a Parsl workflow then runs on a
        runner thread (queued behind any other Parsl workflow of this process)."""
        prepared = self.op_prepare(description, bps_config)
        return self.op_submit(prepared["wms_id"])

    def op_prepare(self, description: Any, bps_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``service.prepare`` of a description (``{"name", "jobs": [...]}``, see WorkflowSpec);
        the id to pass to ``submit`` is the new submit path."""
        self._require_up()
        spec = parse_workflow(description, "prepare")
        if bps_config is not None and not isinstance(bps_config, Mapping):
            raise BackendRejected(f"prepare: bps_config must be a table, not {type(bps_config).__name__}")
        with wms_errors("prepare", self.class_path):
            path = new_submit_path(self._root, spec.name)
            gw = generic_workflow(spec)
            config = base_config(self.config, path, bps_config, parsl_guard(path) if self._parsl() else "")
        wf = self._svc_call(self._service, "prepare", config, gw, out_prefix=path)
        with self._lock:
            self._prepared[path] = wf
            if self._parsl():
                self._publish([self._tracker.observe(path, "READY", WORKFLOW, path, spec.name, Observed.POLL)]
                              + [self._tracker.observe(job_key(path, j.name), "UNREADY", JOB, path, j.name,
                                                       Observed.POLL) for j in spec.order()])
        return {"wms_id": path, "name": spec.name, "submit_path": path}

    def op_submit(self, wms_id: str, **kwargs: Any) -> dict[str, Any]:
        """``service.submit`` of a prepared workflow (by the id ``prepare`` returned)."""
        self._require_up()
        with self._lock:
            wf = self._prepared.pop(str(wms_id), None)
        if wf is None:
            raise BackendRejected(f"submit: no prepared workflow {wms_id!r} in session {self.name!r}")
        path = str(wms_id)
        if self._parsl():
            run = ParslRun(self._service, wf, path)
            with self._lock:
                self._track(run)
                run.start()
                self._observe_run(run, Observed.POLL)
            return {"wms_id": path, "name": run.name, "submit_path": path}
        self._svc_call(self._service, "submit", wf, **kwargs)
        new_id = str(getattr(wf, "run_id", None) or path)
        self._follow(new_id, str(getattr(wf, "name", "")))
        return {"wms_id": new_id, "name": str(getattr(wf, "name", "")), "submit_path": path}

    def op_restart(self, wms_id: str) -> dict[str, Any]:
        """Re-run only the failed and pruned jobs. Parsl: by submit path, in the background
        (the id stays the same); other services: ``service.restart`` (its new id is watched)."""
        self._require_up()
        wms_id = str(wms_id)
        if self._parsl():
            return self._restart_parsl(wms_id)
        new_id, run_name, message = self._svc_call(self._query, "restart", wms_id)
        if not new_id:
            raise BackendRejected(f"restart {wms_id!r}: {message or 'refused by ' + self.class_path}")
        self._follow(str(new_id), str(run_name or ""))
        return {"wms_id": str(new_id), "name": str(run_name or ""), "message": str(message or "")}

    def _restart_parsl(self, wms_id: str) -> dict[str, Any]:
        from lsst.ctrl.bps.parsl.configuration import get_workflow_filename
        from lsst.ctrl.bps.parsl.workflow import ParslWorkflow

        with self._lock:
            active = self._runs.get(wms_id)
            if active is not None:
                raise BackendRejected(f"restart {wms_id!r}: the workflow is still {active.phase}")
        if not os.path.isfile(get_workflow_filename(wms_id)):
            raise BackendRejected(f"restart {wms_id!r}: not a Parsl submit path (no {get_workflow_filename(wms_id)})")
        with wms_errors("restart", self.class_path):
            wf = ParslWorkflow.read(wms_id)
        with self._lock:
            done = {s.name for s in self._tracker.jobs_of(wms_id).values() if s.native == "SUCCEEDED"}
            run = ParslRun(self._service, wf, wms_id, mode="restart", done_before=done)
            self._track(run)
            run.start()
            self._observe_run(run, Observed.POLL)
        return {"wms_id": wms_id, "name": run.name, "message": ""}

    def op_cancel(self, wms_id: str, pass_thru: str | None = None) -> dict[str, Any]:
        """Parsl (this session's runs): jobs not started never run, running jobs are signalled;
        other services: ``service.cancel``. Returns ``{"ok", "message"}``."""
        self._require_up()
        wms_id = str(wms_id)
        with self._lock:
            run = self._runs.get(wms_id)
        if run is not None and run.cancel():
            with self._lock:
                if self._runs.get(wms_id) is run:
                    self._observe_run(run, Observed.POLL)
            return {"ok": True, "message": f"cancelled {wms_id}"}
        if self._parsl():
            seen = self._tracker.seen.get(wms_id)
            if seen is None:
                raise BackendRejected(f"cancel: unknown workflow {wms_id!r} in session {self.name!r}")
            return {"ok": False, "message": f"{wms_id} is not running (state {seen.native})"}
        ok, message = self._svc_call(self._query, "cancel", wms_id, pass_thru=pass_thru)
        if ok and self._has_report:
            with self._lock:
                self._report_one(wms_id, Observed.POLL)
        return {"ok": bool(ok), "message": str(message or "")}

    def _follow(self, wms_id: str, name: str) -> None:
        """Watch a run through report(); a service without report() gets one SUBMITTED state."""
        with self._lock:
            if self._has_report:
                self._watched[wms_id] = False
                self._report_one(wms_id, Observed.POLL)
            else:
                self._publish([self._tracker.observe(
                    wms_id, "PENDING", WORKFLOW, wms_id, name, Observed.POLL,
                    f"submitted; {self.class_path} has no report(): no further states")])

    # -- queries ------------------------------------------------------------------------------------

    def op_report(self, wms_id: str | None = None, user: str | None = None, hist: float = 0,
                  pass_thru: str | None = None, is_global: bool = False,
                  return_exit_codes: bool = False) -> dict[str, Any]:
        """``service.report``: ``{"runs": [WmsRunReport as dicts], "message"}``."""
        self._require_up()
        runs, message = self._svc_call(self._query, "report", wms_workflow_id=wms_id, user=user, hist=hist,
                                       pass_thru=pass_thru, is_global=is_global, return_exit_codes=return_exit_codes)
        return {"runs": plain(list(runs or [])), "message": str(message or "")}

    def op_get_status(self, wms_id: str, hist: float = 1, is_global: bool = False) -> dict[str, Any]:
        self._require_up()
        state, message = self._svc_call(self._query, "get_status", wms_id, hist=hist, is_global=is_global)
        return {"state": plain(state), "message": str(message or "")}

    def op_list_submitted_jobs(self, wms_id: str | None = None, user: str | None = None, require_bps: bool = True,
                               pass_thru: str | None = None, is_global: bool = False) -> list[Any]:
        self._require_up()
        return list(plain(self._svc_call(self._service, "list_submitted_jobs", wms_id=wms_id, user=user,
                                         require_bps=require_bps, pass_thru=pass_thru, is_global=is_global) or []))

    def op_ping(self, pass_thru: str | None = None) -> dict[str, Any]:
        self._require_up()
        status, message = self._svc_call(self._query, "ping", pass_thru)
        return {"status": int(status), "message": str(message or "")}

    def op_run_submission_checks(self) -> dict[str, Any]:
        self._require_up()
        self._svc_call(self._service, "run_submission_checks")
        return {"ok": True}

    def op_status(self, wms_id: str | None = None) -> Any:
        """The session's own view (works for every service, Parsl included):
        ``{"wms_id", "name", "state", "detail", "jobs": {name: WmsStates name}}``, or a list of
        them for every workflow it knows when ``wms_id`` is omitted."""
        self._require_up()
        with self._lock:
            if wms_id is None:
                return [self._tracker.view(k) for k in sorted(self._tracker.workflows())]
            if str(wms_id) not in self._tracker.seen:
                raise BackendRejected(f"status: unknown workflow {wms_id!r} in session {self.name!r}")
            return self._tracker.view(str(wms_id))

    def op_watch(self, wms_id: str) -> dict[str, Any]:
        """Follow a run submitted elsewhere (``bps submit``) through ``report()`` polling."""
        self._require_up()
        wms_id = str(wms_id)
        with self._lock:
            self._watched[wms_id] = False
            self._report_one(wms_id, Observed.POLL)
            return self._tracker.view(wms_id)


def is_final(native: str) -> bool:
    return native in FINAL_NATIVE


__all__ = ["OPERATIONS", "WmsOperations", "is_final", "wms_errors"]
