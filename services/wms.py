"""The LSST ctrl_bps backend session: any ``BaseWmsService`` (``lsst.ctrl.bps``) by class path.

A session builds its service as BPS does (``wmsServiceClass``): from the session's BpsConfig for
prepare/submit, from ``{}`` for report/status/cancel/ping/restart. Workflows come from a flowbus
description (:class:`~flowbus.schemas.WorkflowSpec`), become a ``GenericWorkflow`` in code (no
butler), and are prepared under ``<submit-dir>/<name>-<UTC time>-<n>``.

Observation, two paths:

* Parsl (``lsst.ctrl.bps.parsl.ParslService``, whose ``submit`` blocks and which has no
  ``report``): the workflow runs on a runner thread, one Parsl workflow at a time per process
  (see :mod:`._wms_parsl`), and each poll reads the job futures (``poll-interval``). A job's
  end is also published from its future's done-callback, in Parsl's thread (``observed=push``).
* Any service that implements ``report()`` (HTCondor, PanDA, ...): each watched run is
  reported every ``report-interval`` seconds and the states diffed.

Events: ``StateChanged`` with ``native`` the ``WmsStates`` name and ``state`` mapped (UNREADY,
READY -> queued; PENDING -> submitted; RUNNING -> active; HELD -> suspended; SUCCEEDED ->
complete; FAILED -> aborted; DELETED, PRUNED -> cancelled; UNKNOWN, MISFIT -> unknown). The
workflow's key is its wms id (Parsl: the submit path), a job's ``<wms id>/<job name>``; ``attrs``
carry ``kind`` (workflow/job), ``wms_id`` and ``name``.

Threads: :meth:`WmsSession.poll` runs on one worker thread; :meth:`WmsSession.call` may come from
any thread; one lock guards the bookkeeping. :meth:`WmsSession.stop` cancels the session's Parsl
runs and joins their threads: nothing is left behind. No Python process is ever forked.
Parsl runs cannot move to another process: :meth:`WmsSession.release` (a newer incarnation runs
elsewhere) only stops observing, and they end here, unobserved.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog

from flowbus.schemas import (
    BackendError,
    BackendRejected,
    Connected,
    Disconnected,
    Event,
    Observed,
    Resynced,
    UnknownOperation,
    WmsSessionConfig,
)

from ._base import Emit, dispatch
from ._wms_build import base_config, load_class
from ._wms_model import BACKEND, FINAL_NATIVE, JOB, WORKFLOW, Tracker, job_key
from ._wms_ops import OPERATIONS, WmsOperations, wms_errors
from ._wms_parsl import ParslRun, is_parsl_service

_IDLE_S = 0.5


def _private_temp_root() -> str:
    """``<tmp>/flowbus-wms-<uid>``: this user's, 0700, and refused when someone else made it (or a
    symlink) first: a fixed name in shared temp space must not be anyone else's to prepare."""
    root = os.path.join(tempfile.gettempdir(), f"flowbus-wms-{os.getuid()}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(13, f"{root} is not a directory of ours; set submit-dir")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(root, 0o700)
    return root


class WmsSession(WmsOperations):
    """A session with one ctrl_bps WMS service (implements ``BackendSession``).

    Operations (:meth:`call`), results as plain data:
    ``submit_workflow(description, bps_config=None) -> {"wms_id", "name", "submit_path"}``
    (prepare + submit; the usual entry point), ``prepare(description, bps_config=None)``,
    ``submit(wms_id)``, ``restart(wms_id)`` (failed and pruned jobs only),
    ``cancel(wms_id, pass_thru=None) -> {"ok", "message"}``,
    ``report(wms_id=None, user=None, hist=0, pass_thru=None, is_global=False,
    return_exit_codes=False) -> {"runs": [...], "message"}``, ``get_status(wms_id)``,
    ``list_submitted_jobs(...)``, ``ping(pass_thru=None) -> {"status", "message"}``,
    ``run_submission_checks()``, ``status(wms_id=None)`` (the session's own view, for every
    service) and ``watch(wms_id)`` (follow a run submitted elsewhere through ``report()``).

    Errors: ``BackendRejected`` (bad description, unknown id, unimportable service class),
    ``UnknownOperation`` (``"<op> is not supported by <class>"``), ``BackendUnavailable``,
    ``BackendProtocolError`` (anything else the plugin raised, named and chained).
    """

    backend = BACKEND

    def __init__(self, config: WmsSessionConfig) -> None:
        self.config = config
        self.name = config.name
        self._log = structlog.get_logger("flowbus.wms").bind(backend=BACKEND, session_id=config.name)
        self._lock = threading.RLock()
        self._tracker = Tracker(config.name)
        self._emit: Emit | None = None
        self._service: Any = None
        self._query: Any = None
        self._cls: type | None = None
        self._root = ""
        self._runs: dict[str, ParslRun] = {}
        self._prepared: dict[str, Any] = {}
        #: runs observed through report(); the value is True once a first report has been seen
        self._watched: dict[str, bool] = {}
        self._has_report = False
        self._next_report = 0.0
        self._phase = "new"
        self._observing = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, emit: Emit, known: Mapping[str, Event], *, previous_address: str | None = None) -> None:
        """Import and build the service, publish ``Connected``, then the ``resync`` differences
        with ``known``: runs of a reporting service are reported again; a Parsl run that was
        not finished when the last incarnation ended has lost its runner (it ran in that
        process) and goes UNKNOWN, to be restarted with ``restart(<wms id>)``.

        Raises ``BackendRejected`` naming the class path when it cannot be imported or is not
        a ``BaseWmsService``, or when the service cannot be built."""
        with self._lock:
            if self._phase != "new":
                raise BackendRejected(f"start: session {self.name!r} was already started")
            cls = load_class(self.config.service_class)
            with wms_errors("start", self.config.service_class):
                self._service = cls(base_config(self.config))
                self._query = cls({})
            self._cls = cls
            self._has_report = not is_parsl_service(cls) and _implements(cls, "report")
            try:
                self._root = self.config.submit_dir or os.path.join(_private_temp_root(), self.name)
                os.makedirs(self._root, exist_ok=True)
            except OSError as exc:
                raise BackendRejected(f"start: submit-dir {self.config.submit_dir or 'default'!r}: "
                                      f"{exc.strerror or exc}") from exc
            self._emit = emit
            self._phase = "up"
            ping = self._try_ping()
            self._publish([Connected(source=self.name, backend=BACKEND, address=self._root,
                                     detail=f"{self.config.service_class}{ping}")])
            self._tracker.seed(known)
            changed = self._resync()
            self._publish([Resynced(source=self.name, backend=BACKEND, changed=changed,
                                    resources=len(self._tracker.seen))])
        self._log.info("wms.session.started", service=self.config.service_class, submit_dir=self._root)

    def _try_ping(self) -> str:
        if not _implements(self._cls, "ping"):
            return ""
        try:
            with wms_errors("ping", self.config.service_class):
                status, message = self._query.ping(None)
        except UnknownOperation:
            return ""
        except BackendError as exc:
            self._log.warning("wms.ping.failed", error=str(exc))
            return f"; ping failed: {exc}"
        return "" if int(status) == 0 else f"; ping {status}: {message}"

    def _resync(self) -> int:
        count = 0
        for wms_id, seen in self._tracker.workflows().items():
            if seen.native in FINAL_NATIVE:
                continue
            if self._has_report:
                self._watched[wms_id] = False
                count += self._report_one(wms_id, Observed.RESYNC)
                continue
            lost = ("its runner ended with the previous session; restart(wms_id) re-runs the unfinished jobs"
                    if self._cls is not None and is_parsl_service(self._cls)
                    else f"{self.config.service_class} has no report(): state unknown")
            events = [self._tracker.observe(k, "UNKNOWN", JOB, wms_id, s.name, Observed.RESYNC, lost)
                      for k, s in self._tracker.jobs_of(wms_id).items() if s.native not in FINAL_NATIVE]
            events.append(self._tracker.observe(wms_id, "UNKNOWN", WORKFLOW, wms_id, seen.name, Observed.RESYNC, lost))
            self._publish(events)
            count += sum(1 for e in events if e is not None)
        return count

    def poll(self) -> float:
        """Observe once: every Parsl run's futures, and (when due) every watched run's report."""
        with self._lock:
            if self._phase != "up":
                return _IDLE_S
            for run in list(self._runs.values()):
                self._observe_run(run, Observed.POLL)
            now = time.monotonic()
            if self._watched and now >= self._next_report:
                self._next_report = now + self.config.report_interval
                for wms_id in list(self._watched):
                    try:
                        self._report_one(wms_id, Observed.POLL)
                    except BackendError as exc:
                        self._log.warning("wms.report.failed", wms_id=wms_id, error=str(exc))
            if self._runs:
                return self.config.poll_interval
            if self._watched:
                return max(0.01, min(self.config.report_interval, self._next_report - time.monotonic()))
            return _IDLE_S

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one operation (see the class docstring); results are plain, msgpack-able data."""
        return dispatch(self, OPERATIONS, operation, *args, **kwargs)

    def operations(self) -> list[str]:
        return sorted(OPERATIONS)

    def stop(self) -> None:
        """Cancel this session's Parsl runs (queued ones never start), join their threads,
        publish their final states and ``Disconnected``."""
        with self._lock:
            if self._phase in ("closed", "new", "released"):
                self._phase = "closed"
                return
            self._phase = "closing"
            runs = list(self._runs.values())
        for run in runs:
            if run.phase != "done":
                run.cancel()
            if not run.join(30.0):
                self._log.error("wms.run.not_joined", wms_id=run.wms_id)
        with self._lock:
            for run in runs:
                self._observe_run(run, Observed.POLL)
            self._phase = "closed"
            self._publish([Disconnected(source=self.name, backend=BACKEND, reason="stopped", will_retry=False)])
        self._log.info("wms.session.stopped")

    def release(self) -> None:
        """Let go for a newer incarnation: stop observing, publish nothing, cancel nothing.

        Runs of a reporting service (HTCondor, PanDA, ...) live in the WMS: the new session
        reports them again (``resync``). Parsl runs live in this process and cannot move: each
        goes on here until it ends (its jobs' outputs are written as usual), unobserved; the new
        incarnation marks it UNKNOWN, and ``restart(<wms id>)`` there re-runs its unfinished
        jobs (best once it has ended here, or they run twice)."""
        with self._lock:
            if self._phase in ("closed", "released"):
                return
            self._phase = "released"
            self._emit = None
            for run in self._runs.values():
                run.on_done = None
            self._runs.clear()
            self._watched.clear()
        self._log.info("wms.session.released", submit_dir=self._root)

    def kill(self) -> None:
        """Immediate: running jobs are killed and queued runs dropped, without waiting; never raises."""
        try:
            self._phase = "closed"
            for run in list(self._runs.values()):
                run.cancel(timeout=0.0)
        except Exception as exc:  # noqa: BLE001 - kill never raises, by contract
            self._log.warning("wms.kill.failed", error=repr(exc))

    # -- observing ---------------------------------------------------------------------------------

    def _require_up(self) -> None:
        if self._phase != "up":
            raise BackendRejected(f"session {self.name!r} is {self._phase}, not started")

    def _track(self, run: ParslRun) -> None:
        """Register a Parsl run: observed by every poll, and at once when a job's future resolves."""
        self._runs[run.wms_id] = run
        run.on_done = lambda: self._future_done(run)

    def _future_done(self, run: ParslRun) -> None:
        # from a Parsl thread: Parsl itself says a job ended (observed=push); skipped when this
        # thread is already observing (a future that resolved while being hooked)
        with self._lock:
            if self._observing or self._phase not in ("up", "closing") or self._runs.get(run.wms_id) is not run:
                return
            self._observe_run(run, Observed.PUSH)

    def _observe_run(self, run: ParslRun, observed: Observed) -> None:
        self._observing = True
        try:
            self._observe_run_once(run, observed)
        finally:
            self._observing = False

    def _observe_run_once(self, run: ParslRun, observed: Observed) -> None:
        finished = run.phase == "done"  # read first: once done, every future is final
        jobs = run.job_states()
        wf_native, wf_detail = run.workflow_state(jobs)
        events: list[Any] = []
        if not finished:
            events.append(self._tracker.observe(run.wms_id, wf_native, WORKFLOW, run.wms_id, run.name, observed,
                                                wf_detail))
        for job, (native, detail) in jobs.items():
            events.append(self._tracker.observe(job_key(run.wms_id, job), native, JOB, run.wms_id, job, observed,
                                                detail))
        if finished:
            events.append(self._tracker.observe(run.wms_id, wf_native, WORKFLOW, run.wms_id, run.name, observed,
                                                wf_detail))
            if self._runs.get(run.wms_id) is run:
                del self._runs[run.wms_id]
            run.join(5.0)
        self._publish(events)

    def _report_one(self, wms_id: str, observed: Observed) -> int:
        """Report one run and publish its differences; stop watching it once it is final."""
        if not self._has_report:
            raise UnknownOperation(f"watching needs report(), which is not supported by {self.config.service_class}")
        runs, message = self._svc_call(self._query, "report", wms_workflow_id=wms_id)
        runs = list(runs or [])
        run = next((r for r in runs if str(r.wms_id) == wms_id), runs[0] if runs else None)
        events: list[Any] = []
        if run is None:
            events.append(self._tracker.observe(wms_id, "UNKNOWN", WORKFLOW, wms_id, "", observed,
                                                str(message or "not found")))
            self._watched.pop(wms_id, None)
        else:
            name = str(run.run or run.label or "")
            jobs = list(run.jobs or [])
            for j in jobs:
                events.append(self._tracker.observe(job_key(wms_id, str(j.name)), _name(j.state), JOB, wms_id,
                                                    str(j.name), observed))
            native = _name(run.state)
            events.append(self._tracker.observe(wms_id, native, WORKFLOW, wms_id, name, observed, str(message or "")))
            self._watched[wms_id] = True
            if native in FINAL_NATIVE and all(_name(j.state) in FINAL_NATIVE for j in jobs):
                self._watched.pop(wms_id, None)
        self._publish(events)
        return sum(1 for e in events if e is not None)

    def _publish(self, events: list[Any]) -> None:
        if self._emit is None:
            return
        for ev in events:
            if ev is not None:
                self._emit(ev)


def _name(state: Any) -> str:
    return str(getattr(state, "name", state) or "UNKNOWN")


def _implements(cls: type | None, method: str) -> bool:
    """True when ``cls`` overrides ``BaseWmsService.<method>`` (the base only raises)."""
    from lsst.ctrl.bps import BaseWmsService

    return cls is not None and getattr(cls, method, None) is not getattr(BaseWmsService, method, None)


def __getattr__(name: str) -> Any:
    # ``flowbus.services.wms.LocalThreads``: the socket-free Parsl site, imported on first use
    if name == "LocalThreads":
        from ._wms_sites import LocalThreads

        return LocalThreads
    raise AttributeError(name)


__all__ = ["WmsSession", "WmsSessionConfig"]
