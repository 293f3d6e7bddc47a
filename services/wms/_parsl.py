"""Running Parsl workflows (``lsst.ctrl.bps.parsl``) from a session: one at a time per process.

Parsl holds one loaded DataFlowKernel per process, and ``ParslService.submit`` (like its
restart) blocks until the workflow ends. So each submission gets a runner thread that waits for
the process-wide :data:`PARSL_LOCK` (several WMS sessions may share one actor process: their
workflows queue), runs ``service.submit(workflow)``, and always unloads Parsl afterwards, also
after an error (a DFK left loaded would make every later submit fail). Meanwhile the session
reads the job futures (``task_status()``) from its poll thread.

Restart mirrors ``ParslService.restart`` but takes every checkpoint under the workflow's own
absolute ``run_dir`` (the service looks for ``runinfo`` in the current directory and only at the
last run), so it works from any directory and after several restarts, and it is observable.

Cancel: the site's ``commandPrefix`` gets a guard (see :func:`._build.parsl_guard`): once
the cancel flag exists, jobs that have not started exit 130 at once (their dependents are pruned),
and running jobs are ended by signal through the pids they recorded.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import structlog

from ._build import CANCEL_FLAG, PID_DIR
from ._model import FINAL_NATIVE, PARSL_TO_WMS

#: one loaded Parsl DFK per process: every Parsl workflow of every session queues here
PARSL_LOCK = threading.Lock()

_log = structlog.get_logger("flowbus.wms.parsl")


def is_parsl_service(cls: type) -> bool:
    try:
        from lsst.ctrl.bps.parsl import ParslService
    except ImportError:
        return False
    return issubclass(cls, ParslService)


def is_parsl_workflow(wf: Any) -> bool:
    try:
        from lsst.ctrl.bps.parsl.workflow import ParslWorkflow
    except ImportError:
        return False
    return isinstance(wf, ParslWorkflow)


def unload(wf: Any, threads_before: set[threading.Thread] | frozenset[threading.Thread] = frozenset()) -> None:
    """Unload Parsl whatever state the workflow left it in (never raises).

    A DFK whose constructor raised (an executor that fails to start) is never registered, yet
    its job-status poller thread already runs: Parsl timers started since ``threads_before``
    are closed too."""
    import parsl
    from parsl.dataflow.dflow import DataFlowKernelLoader
    from parsl.utils import Timer

    dfk = getattr(wf, "dfk", None) or DataFlowKernelLoader._dfk
    if dfk is not None:
        try:
            dfk.cleanup()
        except Exception as exc:  # noqa: BLE001 - a cleanup that fails must not block the next run
            _log.warning("wms.parsl.cleanup_failed", error=repr(exc))
    if wf is not None:
        wf.dfk = None
    parsl.clear()
    for thread in set(threading.enumerate()) - set(threads_before):
        owner = getattr(getattr(thread, "_target", None), "__self__", None)
        if isinstance(owner, Timer):
            _log.warning("wms.parsl.orphan_timer_closed", thread=thread.name)
            owner.close(timeout=2.0)


class ParslRun:
    """One submission (or restart) of a Parsl workflow, on its own runner thread.

    ``phase``: ``queued`` (waiting for :data:`PARSL_LOCK`), ``running``, ``done``.
    """

    def __init__(self, service: Any, workflow: Any, wms_id: str, mode: str = "submit",
                 done_before: set[str] | None = None) -> None:
        self.service = service
        #: restart: jobs that succeeded before; shown SUCCEEDED until their future says otherwise
        self.done_before = set(done_before or ())
        self.wf = workflow
        self.wms_id = wms_id
        self.name = str(workflow.name)
        self.mode = mode
        self.phase = "queued"
        self.error = ""
        self.cancelled = False
        self.started_at = 0.0
        self._abort = threading.Event()
        #: called (from Parsl's threads) when a job's future resolves: the session observes at once
        self.on_done: Callable[[], None] | None = None
        self._hooked: set[str] = set()
        self.thread = threading.Thread(target=self._run, name=f"wms-parsl-{self.name}", daemon=True)

    # -- running -----------------------------------------------------------------------------------

    def start(self) -> None:
        flag = os.path.join(self.wms_id, CANCEL_FLAG)
        if os.path.exists(flag):
            os.unlink(flag)
        self.thread.start()

    def _run(self) -> None:
        log = _log.bind(wms_id=self.wms_id, mode=self.mode)
        acquired = False
        threads_before: set[threading.Thread] = set()
        try:
            while not PARSL_LOCK.acquire(timeout=0.05):
                if self._abort.is_set():
                    return
            acquired = True
            threads_before = set(threading.enumerate())
            if self._abort.is_set():
                return
            self.phase = "running"
            self.started_at = time.monotonic()
            log.info("wms.parsl.started")
            if self.mode == "restart":
                self._restart()
            else:
                self.service.submit(self.wf)
            log.info("wms.parsl.complete")
        except BaseException as exc:  # noqa: BLE001 - reported as the workflow's state
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("wms.parsl.failed", error=self.error)
        finally:
            if acquired:
                try:
                    unload(self.wf, threads_before)
                finally:
                    PARSL_LOCK.release()
            self.phase = "done"

    def _restart(self) -> None:
        from parsl.utils import get_all_checkpoints

        wf = self.wf
        run_dir = wf.parsl_config.run_dir
        if not os.path.isabs(run_dir):
            run_dir = os.path.join(self.wms_id, run_dir)
        wf.parsl_config.checkpoint_files = list(get_all_checkpoints(run_dir))
        wf.load_dfk()
        wf.run()

    # -- observing ---------------------------------------------------------------------------------

    def job_states(self) -> dict[str, tuple[str, str]]:
        """``{job name: (WmsStates name, detail)}`` from the futures."""
        out: dict[str, tuple[str, str]] = {}
        for name, job in self.wf.jobs.items():
            fut = job.future
            if fut is None or (name in self.done_before and fut.task_status() in ("unsched", "pending")):
                if name in self.done_before:
                    out[name] = ("SUCCEEDED", "")
                elif self.phase == "done":
                    native = "DELETED" if self.cancelled else ("PRUNED" if self.error else "UNKNOWN")
                    out[name] = (native, "never started")
                else:
                    out[name] = ("UNREADY", "")
                continue
            if name not in self._hooked and self.on_done is not None:
                self._hooked.add(name)
                fut.add_done_callback(self._future_done)
            status = fut.task_status()
            if self.phase == "done" and status in ("unsched", "pending"):
                out[name] = ("DELETED" if self.cancelled else "PRUNED", "never started")
                continue
            native = PARSL_TO_WMS.get(status, "UNKNOWN")
            detail = ""
            if native == "FAILED":
                exc = fut.exception() if fut.done() else None
                detail = f"{type(exc).__name__}: {exc}" if exc is not None else "failed"
                if self.cancelled and _killed(exc):
                    native = "DELETED"
            elif native == "PRUNED":
                detail = "a dependency failed"
            out[name] = (native, detail)
        return out

    def _future_done(self, _future: Any) -> None:
        callback = self.on_done
        if callback is not None:
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - never break Parsl's completion path
                _log.warning("wms.parsl.callback_failed", error=repr(exc))

    def workflow_state(self, jobs: dict[str, tuple[str, str]]) -> tuple[str, str]:
        if self.phase == "queued":
            return "PENDING", "waiting for this process's Parsl (one workflow at a time)"
        if self.phase == "running":
            return "RUNNING", ""
        if self.cancelled:
            return "DELETED", "cancelled"
        if self.error:
            return "FAILED", self.error
        natives = {n for n, _ in jobs.values()}
        if natives <= {"SUCCEEDED"}:
            return "SUCCEEDED", ""
        if natives & {"FAILED", "DELETED"} or "PRUNED" in natives:
            bad = sorted(name for name, (n, _) in jobs.items() if n == "FAILED")
            return "FAILED", f"failed: {', '.join(bad)}" if bad else ""
        return ("SUCCEEDED" if natives <= FINAL_NATIVE else "UNKNOWN"), ""

    # -- cancelling --------------------------------------------------------------------------------

    def cancel(self, timeout: float = 10.0) -> bool:
        """Jobs not started yet never run; running jobs get SIGTERM, then SIGKILL after half of
        ``timeout``; waits up to ``timeout`` for the runner (0: signal once, do not wait).
        False when the run had already finished."""
        if self.phase == "done":
            return False
        self.cancelled = True
        self._abort.set()
        try:
            with open(os.path.join(self.wms_id, CANCEL_FLAG), "w") as fh:
                fh.write("cancelled by flowbus\n")
        except OSError as exc:
            _log.warning("wms.parsl.cancel_flag_failed", error=str(exc))
        self._signal_jobs(signal.SIGTERM if timeout > 0 else signal.SIGKILL)
        start = time.monotonic()
        while self.thread.is_alive() and time.monotonic() - start < timeout:
            self.thread.join(0.1)
            late = time.monotonic() - start > timeout / 2
            self._signal_jobs(signal.SIGKILL if late else signal.SIGTERM)
        return True

    def _signal_jobs(self, sig: int) -> None:
        pid_dir = os.path.join(self.wms_id, PID_DIR)
        try:
            names = os.listdir(pid_dir)
        except OSError:
            return
        me = os.getpid()
        for name in names:
            try:
                proc = psutil.Process(int(name))
                if me not in {p.pid for p in proc.parents()}:  # only our own jobs (pids are reused)
                    continue
                for p in [*proc.children(recursive=True), proc]:
                    p.send_signal(sig)
            except (ValueError, psutil.Error):
                continue

    def join(self, timeout: float) -> bool:
        if self.thread.is_alive() or self.thread.ident is not None:
            self.thread.join(timeout)
        return not self.thread.is_alive()


def _killed(exc: BaseException | None) -> bool:
    code = getattr(exc, "exitcode", None)
    return code in (130, -signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGKILL)


__all__ = ["PARSL_LOCK", "ParslRun", "is_parsl_service", "is_parsl_workflow", "unload"]
