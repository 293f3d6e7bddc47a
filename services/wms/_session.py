"""The ctrl_bps (the WMS backend) session: any LSST ``BaseWmsService`` by class path.

A session builds its service as BPS does (``wmsServiceClass``): from the session's BpsConfig for
prepare/submit, from ``{}`` for report/status/cancel/ping/restart. Workflows come from a flowbus
description (:class:`~flowbus.schemas.WorkflowSpec`), become a ``GenericWorkflow`` in code (no
butler), and are prepared under ``<submit-dir>/<name>-<UTC time>-<n>``.

Observation, two paths:

* Parsl (``lsst.ctrl.bps.parsl.ParslService``, whose ``submit`` blocks and which has no
  ``report``): the workflow runs on a runner thread, one Parsl workflow at a time per process
  (see :mod:`._parsl`), and each poll reads the job futures (``poll-interval``). A job's end is
  also published from its future's done-callback, in Parsl's thread (``observed=push``).
* Any service that implements ``report()`` (HTCondor, PanDA, ...): each watched run is
  reported every ``report-interval`` seconds and the states diffed.

Events: ``StateChanged`` with ``native`` the ``WmsStates`` name and ``state`` mapped (UNREADY,
READY -> queued; PENDING -> submitted; RUNNING -> active; HELD -> suspended; SUCCEEDED ->
complete; FAILED -> aborted; DELETED, PRUNED -> cancelled; UNKNOWN, MISFIT -> unknown). The
workflow's key is its wms id (Parsl: the submit path), a job's ``<wms id>/<job name>``; ``attrs``
carry ``kind`` (workflow/job), ``wms_id`` and ``name``.

Reaching the WMS: a service that implements ``ping()`` is pinged when the session opens and then
every ``report-interval``; a ping that fails (non-zero status, the WMS unreachable, the plugin
raising) means the WMS is unreachable, and so does a ``report()`` that cannot reach it. At
start the session then opens DOWN (``Disconnected``, retried with backoff from
``report-interval``); later it is a loss: ``Disconnected`` within ``report-interval`` plus one
ping, then reconnects (``RecoveryAttempted``, ``Connected``, every unfinished run reported again
as ``resync``, ``Resynced``). Parsl runs in this process: it cannot be unreachable, and a job
killed from outside is a FAILED job. A service class that cannot be imported, a submit-dir that
cannot be made, and a ``bps-config`` naming another service class or a submit path fail the
start (``BackendRejected``).

A WMS that stops answering (a schedd or server that is stopped or hung: the plugin's call
blocks): the session's own ``ping()`` and ``report()`` calls run on a helper thread of their own
and are waited for up to ``request-timeout``. One still running after 1 s names the WMS ``stuck``
(:meth:`WmsSession.stuck_for`, listed by the actor's ``ping()``); after ``request-timeout`` it is
a loss (``BackendTimeout``: ``Disconnected``, then reconnects). The hung call is not started
again: every attempt fails at once until it returns. Only that session's poll waits; the other
sessions of the actor go on.

Threads: :meth:`WmsSession.poll` runs on one worker thread; :meth:`WmsSession.call` may come from
any thread; one lock guards the bookkeeping. :meth:`WmsSession.stop` cancels the session's Parsl
runs and joins their threads: nothing is left behind. No Python process is ever forked.
Parsl runs cannot move to another process: :meth:`WmsSession.release` (a newer incarnation runs
elsewhere) only stops observing, and they end here, unobserved.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flowbus.schemas import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    ErrorEvent,
    Event,
    Observed,
    UnknownOperation,
    WmsSessionConfig,
)

from .._ops import Operations
from .._retention import Retired
from .._session import IDLE_S, Opened, Phase, SessionBase
from ._build import base_config, check_session_keys, implements, load_class
from ._errors import call_service, wms_errors
from ._logs import logs as _logs  # noqa: F401 - registers the logs operation on OPS
from ._model import BACKEND, FINAL_NATIVE, JOB, WORKFLOW, Tracker, changed, job_key, state_name
from ._ops import OPS
from ._parsl import ParslRun, is_parsl_service

#: how long a Parsl thread's job-end callback waits at a time for the lock before it looks
#: whether the session is closing (then the closing thread observes the run itself)
_CALLBACK_WAIT_S = 0.05
#: report() failures in a row (not connection errors: those are a loss at once) that make the WMS lost
_REPORT_FAILS = 3
#: a ping() or report() of the session's running this long names the WMS ``stuck``
_STUCK_S = 1.0
#: how often a wait for the session's ping()/report() looks whether the session is closing
_CLOSING_CHECK_S = 0.1


@dataclass
class _Call:
    """One ``ping()``/``report()`` of the session, on a helper thread of its own."""

    method: str
    since: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    thread: threading.Thread | None = None


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


class WmsSession(SessionBase):
    """A session with one ctrl_bps WMS service (implements ``BackendSession``).

    Operations (:meth:`call`, see :mod:`._ops`), results as plain data:
    ``submit_workflow(description, bps_config=None) -> {"wms_id", "name", "submit_path"}``
    (prepare + submit; the usual entry point), ``prepare(description, bps_config=None)``,
    ``submit(wms_id)``, ``restart(wms_id)`` (failed and pruned jobs only),
    ``cancel(wms_id, pass_thru=None) -> {"ok", "message"}``,
    ``report(wms_id=None, user=None, hist=0, pass_thru=None, is_global=False,
    return_exit_codes=False) -> {"runs": [...], "message"}``, ``get_status(wms_id)``,
    ``list_submitted_jobs(...)``, ``ping(pass_thru=None) -> {"status", "message"}``,
    ``run_submission_checks()``, ``status(wms_id=None)`` (the session's own view, for every
    service) and ``watch(wms_id)`` (follow a run submitted elsewhere through ``report()``).

    A WMS that goes down (its ping fails, or report() cannot reach it) is published
    ``Disconnected`` within ``report-interval`` plus one ping, then reconnected with backoff.

    Errors: ``BackendRejected`` (bad description, unknown id, a ``bps_config`` key the session
    owns), ``UnknownOperation`` (``"<op> is not supported by <class>"``), ``BackendUnavailable``
    (the WMS is unreachable, or the session is not up), ``BackendProtocolError`` (anything else
    the plugin raised, named and chained).
    """

    backend = BACKEND
    ops: ClassVar[Operations[Any]] = OPS
    #: retention removes the submit directories of the finished runs this session submitted
    forget_in_backend_default: ClassVar[bool] = True

    def __init__(self, config: WmsSessionConfig) -> None:
        super().__init__(config, backoff_first=config.report_interval)
        self.config: WmsSessionConfig = config
        self._tracker = Tracker(config.name)
        self._cls: type | None = None
        #: the service built from the BpsConfig (prepare, submit) and the one built from ``{}``
        self._service: Any = None
        self._query: Any = None
        self._root = ""
        self._runs: dict[str, ParslRun] = {}
        self._prepared: dict[str, Any] = {}
        #: runs observed through report(); the value is True once a first report has been seen
        self._watched: dict[str, bool] = {}
        self._has_report = False
        self._has_ping = False
        self._next_report = 0.0
        self._observing = False
        self._report_fails = 0
        #: the session's own ping()/report() in flight (lock held to start or clear it)
        self._call: _Call | None = None

    @property
    def address(self) -> str:
        return self._root or self.config.submit_dir

    @property
    def class_path(self) -> str:
        return self.config.service_class

    @property
    def is_parsl(self) -> bool:
        return self._cls is not None and is_parsl_service(self._cls)

    def stuck_for(self) -> float | None:
        """Seconds the session's ``ping()`` or ``report()`` has waited for the WMS, once that is
        1 s or more (it is lost after ``request-timeout``); else None. Lock-free (the actor's ping)."""
        call = self._call
        if call is None or call.done.is_set():
            return None
        waited = time.monotonic() - call.since
        return waited if waited >= _STUCK_S else None

    # -- hooks ---------------------------------------------------------------------------------------

    def _seed(self, known: Mapping[str, Event]) -> None:
        self._tracker.seed(known)

    def _open(self, observed: Observed) -> Opened:
        """Import the class and make the submit dir (once), build the two services, ping, and
        compare the runs the session knows with the WMS: a reporting service's unfinished runs
        are reported again; a Parsl run that was not finished when the last incarnation ended
        has lost its runner (it ran in that process) and goes UNKNOWN, to be re-run with
        ``restart(<wms id>)``."""
        if self._cls is None:
            cls = load_class(self.class_path)
            check_session_keys(self.config.bps_config, "bps-config", self.name, self.class_path)
            try:
                self._root = self.config.submit_dir or os.path.join(_private_temp_root(), self.name)
                os.makedirs(self._root, exist_ok=True)
            except OSError as exc:
                raise BackendRejected(f"start: submit-dir {self.config.submit_dir or 'default'!r}: "
                                      f"{exc.strerror or exc}") from exc
            self._cls = cls
            self._has_report = not is_parsl_service(cls) and implements(cls, "report")
            self._has_ping = implements(cls, "ping")
        with wms_errors("start", self.class_path):
            self._service = self._cls(base_config(self.config))
            self._query = self._cls({})
        self._check_alive("connect")
        events = self._resync(observed)
        self._next_report = time.monotonic() + self.config.report_interval
        self._log.info("wms.session.opened", service=self.class_path, submit_dir=self._root)
        return Opened(self._root, self.class_path, events, len(self._tracker.seen))

    def _observe(self) -> None:
        """Every Parsl run's futures; when due, a ping and every watched run's report."""
        for run in list(self._runs.values()):
            self._observe_run(run, Observed.POLL)
        now = time.monotonic()
        if now < self._next_report or not (self._watched or self._has_ping):
            return
        self._next_report = now + self.config.report_interval
        try:
            self._check_alive("poll")
        except BackendUnavailable:
            raise
        except BackendError as exc:
            self._log.warning("wms.ping.failed", error=str(exc))
        for wms_id in list(self._watched):
            try:
                self._publish(self._report(wms_id, Observed.POLL))
            except BackendUnavailable:
                raise
            except BackendError as exc:
                self._report_failed(wms_id, exc)
            else:
                self._report_fails = 0

    def _report_failed(self, wms_id: str, exc: BackendError) -> None:
        """A report() that raised: an ``ErrorEvent`` at the first failure in a row; after
        :data:`_REPORT_FAILS` in a row the WMS counts as lost (``Disconnected``, then reconnects,
        which succeed once report() answers again)."""
        self._report_fails += 1
        self._log.warning("wms.report.failed", wms_id=wms_id, error=str(exc), fails=self._report_fails)
        if self._report_fails == 1:
            self._publish([self._ev(ErrorEvent, key=wms_id, error_type=f"flowbus.schemas.{type(exc).__name__}",
                                    message=str(exc), operation="report")])
        if self._report_fails >= _REPORT_FAILS:
            self._report_fails = 0
            raise BackendUnavailable(f"report() failed {_REPORT_FAILS} times in a row: {exc}") from exc

    def _drop(self) -> None:
        self._service = self._query = None

    def _close(self, was_up: bool) -> None:
        """Cancel this session's Parsl runs (queued ones never start), join their threads and
        publish their final states (the base then publishes ``Disconnected``)."""
        runs = list(self._runs.values())
        for run in runs:
            if run.phase != "done":
                run.cancel()
            if not run.join(30.0):
                self._log.error("wms.run.not_joined", wms_id=run.wms_id)
        for run in runs:
            self._observe_run(run, Observed.POLL)
        self._drop()

    def _let_go(self) -> None:
        """Stop observing; cancel nothing. Runs of a reporting service (HTCondor, PanDA, ...) live
        in the WMS: the new session reports them again (``resync``). Parsl runs live in this
        process and cannot move: each goes on here until it ends (its jobs' outputs are written
        as usual), unobserved; the new incarnation marks it UNKNOWN, and ``restart(<wms id>)``
        there re-runs its unfinished jobs (best once it has ended here, or they run twice)."""
        for run in self._runs.values():
            run.on_done = None
        self._runs.clear()
        self._watched.clear()
        self._prepared.clear()
        self._drop()

    def _kill(self) -> None:
        """Running jobs are killed and queued runs dropped, without waiting."""
        for run in list(self._runs.values()):
            run.cancel(timeout=0.0)

    def _poll_interval(self) -> float:
        if self._runs:
            return self.config.poll_interval
        if self._watched or self._has_ping:
            return max(0.01, min(self.config.report_interval, self._next_report - time.monotonic()))
        return IDLE_S

    # -- reaching the service --------------------------------------------------------------------------

    def _check_alive(self, operation: str) -> None:
        """Ping a service that implements it: ``BackendUnavailable`` when the WMS is not up
        (non-zero status, unreachable, or the plugin raised), ``BackendRejected`` when the
        service refuses the request itself."""
        if not self._has_ping:
            return
        try:
            answer = self._bounded(self._query, "ping", None)
            with wms_errors("ping", self.class_path):
                status, message = answer
                status = int(status)
        except UnknownOperation:
            self._has_ping = False
            return
        except (BackendUnavailable, BackendRejected):
            raise
        except BackendError as exc:
            raise BackendUnavailable(f"{operation}: {exc}") from exc
        if status != 0:
            raise BackendUnavailable(f"{operation}: {self.class_path} ping says {status}: {message or 'not up'}")

    def _svc_call(self, target: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """A method of one of the session's services (``self._service`` or ``self._query``)."""
        return call_service(target, self.class_path, method, *args, **kwargs)

    def _bounded(self, target: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """:meth:`_svc_call` on a helper thread, waited for up to ``request-timeout`` (lock held).
        Raises ``BackendTimeout`` when the WMS does not answer in time, and at once while an
        earlier call that did not answer still runs (it is never started twice)."""
        call = self._call
        if call is not None:
            if not call.done.is_set():
                raise BackendTimeout(f"{method}: {self.class_path} has not answered the {call.method}() sent "
                                     f"{time.monotonic() - call.since:.1f} s ago (stuck)")
            self._call = None
        call = _Call(method, time.monotonic())

        def run() -> None:
            try:
                call.result = self._svc_call(target, method, *args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                call.error = exc
            finally:
                call.done.set()

        call.thread = threading.Thread(target=run, daemon=True, name=f"wms-{self.name}-{method}")
        self._call = call
        call.thread.start()
        deadline = call.since + self.config.request_timeout
        while not call.done.wait(min(_CLOSING_CHECK_S, max(0.0, deadline - time.monotonic()))):
            if self._closing:
                raise BackendUnavailable(f"{method}: the session is closing")
            if time.monotonic() >= deadline:
                raise BackendTimeout(f"{method}: {self.class_path} did not answer within "
                                     f"{self.config.request_timeout:g} s (stuck)")
        self._call = None
        if call.error is not None:
            raise call.error
        return call.result

    # -- observing ---------------------------------------------------------------------------------

    def _resync(self, observed: Observed) -> list[Event]:
        events: list[Event] = []
        for wms_id, seen in self._tracker.workflows().items():
            if seen.native in FINAL_NATIVE or wms_id in self._runs:
                continue
            if self._has_report:
                self._watched[wms_id] = False
                try:
                    events += self._report(wms_id, observed)
                except BackendUnavailable:
                    raise
                except BackendError as exc:  # the WMS is not back until it reports again
                    raise BackendUnavailable(f"report({wms_id!r}) while resyncing: {exc}") from exc
                continue
            lost = ("its runner ended with the previous session; restart(wms_id) re-runs the unfinished jobs"
                    if self.is_parsl else f"{self.class_path} has no report(): state unknown")
            events += changed([self._tracker.observe(k, "UNKNOWN", JOB, wms_id, s.name, observed, lost)
                               for k, s in self._tracker.jobs_of(wms_id).items() if s.native not in FINAL_NATIVE])
            events += changed([self._tracker.observe(wms_id, "UNKNOWN", WORKFLOW, wms_id, seen.name, observed,
                                                     lost)])
        return events

    def _track(self, run: ParslRun) -> None:
        """Register a Parsl run (lock held): observed by every poll, and at once when a job's
        future resolves."""
        self._runs[run.wms_id] = run
        run.on_done = lambda: self._future_done(run)

    def _future_done(self, run: ParslRun) -> None:
        # from a Parsl thread: Parsl itself says a job ended (observed=push). It never blocks a
        # closing session (stop joins the runner while holding the lock, and observes the run
        # itself), and is skipped when this thread is already observing (a future that resolved
        # while being hooked)
        while not self._lock.acquire(timeout=_CALLBACK_WAIT_S):
            if self._closing:
                return
        try:
            if (self._closing or self._observing or self._phase is not Phase.UP
                    or self._runs.get(run.wms_id) is not run):
                return
            self._observe_run(run, Observed.PUSH)
        finally:
            self._lock.release()

    def _observe_run(self, run: ParslRun, observed: Observed) -> None:
        """Publish what changed in one Parsl run (lock held)."""
        self._observing = True
        try:
            self._observe_run_once(run, observed)
        finally:
            self._observing = False

    def _observe_run_once(self, run: ParslRun, observed: Observed) -> None:
        finished = run.phase == "done"  # read first: once done, every future is final
        jobs = run.job_states()
        wf_native, wf_detail = run.workflow_state(jobs)
        events = []
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
        self._publish(changed(events))

    def _forget(self, retired: Sequence[Retired], in_backend: bool) -> None:
        """Retention: a finished run is no longer observed (neither its futures nor report()),
        so the session drops its last states. With ``forget-in-backend`` (the default) the submit
        directory of a finished run this session submitted (one under its submit-dir) goes too;
        runs submitted elsewhere and followed by ``watch`` are never touched."""
        for r in retired:
            seen = self._tracker.seen.get(r.key)
            run = seen.wms_id if seen is not None and seen.wms_id else r.key
            if run not in self._runs and run not in self._watched:
                self._tracker.seen.pop(r.key, None)
                if in_backend and seen is not None and seen.kind == WORKFLOW:
                    self._remove_run_dir(run)

    def _remove_run_dir(self, path: str) -> None:
        root = os.path.realpath(self._root) if self._root else ""
        real = os.path.realpath(path)
        if not root or os.path.dirname(real) != root or not os.path.isdir(real):
            return  # not a run directory of ours: left alone
        shutil.rmtree(real, ignore_errors=True)
        self._log.debug("wms.run_dir.removed", path=real)

    def _report_run(self, wms_id: str, observed: Observed) -> None:
        """Report one run and publish its differences (lock held)."""
        self._publish(self._report(wms_id, observed))

    def _report(self, wms_id: str, observed: Observed) -> list[Event]:
        """Report one run and return its differences; stop watching it once it is final."""
        if not self._has_report:
            raise UnknownOperation(f"watching needs report(), which is not supported by {self.class_path}")
        runs, message = self._bounded(self._query, "report", wms_workflow_id=wms_id)
        runs = list(runs or [])
        run = next((r for r in runs if str(r.wms_id) == wms_id), runs[0] if runs else None)
        events = []
        if run is None:
            events.append(self._tracker.observe(wms_id, "UNKNOWN", WORKFLOW, wms_id, "", observed,
                                                str(message or "not found")))
            self._watched.pop(wms_id, None)
        else:
            name = str(run.run or run.label or "")
            jobs = list(run.jobs or [])
            for j in jobs:
                events.append(self._tracker.observe(job_key(wms_id, str(j.name)), state_name(j.state), JOB, wms_id,
                                                    str(j.name), observed))
            native = state_name(run.state)
            events.append(self._tracker.observe(wms_id, native, WORKFLOW, wms_id, name, observed, str(message or "")))
            self._watched[wms_id] = True
            if native in FINAL_NATIVE and all(state_name(j.state) in FINAL_NATIVE for j in jobs):
                self._watched.pop(wms_id, None)
        return changed(events)


__all__ = ["WmsSession"]
