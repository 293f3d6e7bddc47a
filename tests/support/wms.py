"""A ctrl_bps ``BaseWmsService`` whose runs move on each ``report()`` (HTCondor and PanDA cannot
run here): the generic report()-polling path of the WMS session is tested against it.

Runs live in a process-wide table (BPS builds a new service object per command, from a
BpsConfig or from ``{}``). Each ``report(<id>)`` returns the run, then advances every job of it by one step
along UNREADY -> PENDING -> RUNNING -> SUCCEEDED; a job named ``fail*`` ends FAILED and its
dependents PRUNED. ``restart`` gives a new id where the failed and pruned jobs start again
(``fail*`` jobs then succeed); ``cancel`` marks every unfinished job DELETED.

:data:`OUTAGE` stands for the WMS being down (a schedd or server killed): while it is set,
``ping`` answers non-zero and ``report`` cannot connect; the runs stay where they were.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lsst.ctrl.bps import (
    BaseWmsService,
    BaseWmsWorkflow,
    BpsConfig,
    GenericWorkflow,
    WmsJobReport,
    WmsRunReport,
    WmsStates,
)

_STEPS = [WmsStates.UNREADY, WmsStates.PENDING, WmsStates.RUNNING]
_FINAL = {WmsStates.SUCCEEDED, WmsStates.FAILED, WmsStates.PRUNED, WmsStates.DELETED}


@dataclass
class _Run:
    wms_id: str
    name: str
    path: str
    parents: dict[str, list[str]]
    states: dict[str, WmsStates] = field(default_factory=dict)
    restarted: bool = False
    reports: int = 0


_RUNS: dict[str, _Run] = {}
_LOCK = threading.Lock()
_IDS = itertools.count(1)
#: set: the WMS is down (ping non-zero, report raises ConnectionError)
OUTAGE = threading.Event()
#: when each ping answered "down" (time.monotonic()), for tests to wait on
DOWN_PINGS: queue.SimpleQueue[float] = queue.SimpleQueue()
#: set: report() raises RuntimeError (the service answers pings but its reports break)
REPORT_BROKEN = threading.Event()
#: set: run_submission_checks() raises (as a plugin does without, e.g., a proxy certificate)
CHECKS_FAIL = threading.Event()
#: how many times run_submission_checks() ran
CHECKS_RUN: list[float] = []


def reset() -> None:
    with _LOCK:
        _RUNS.clear()
    OUTAGE.clear()
    REPORT_BROKEN.clear()
    CHECKS_FAIL.clear()
    CHECKS_RUN.clear()
    while not DOWN_PINGS.empty():
        DOWN_PINGS.get_nowait()


class SteppingWorkflow(BaseWmsWorkflow):  # type: ignore[misc]  # lsst ctrl_bps is untyped
    """What ``prepare`` returns: the job graph, nothing written but a marker file."""

    def __init__(self, name: str, config: BpsConfig, path: str, parents: dict[str, list[str]]) -> None:
        super().__init__(name, config)
        self.submit_path = path
        self.parents = parents

    @classmethod
    def from_generic_workflow(cls, config: BpsConfig, generic_workflow: GenericWorkflow, out_prefix: str,
                              service_class: str) -> SteppingWorkflow:
        parents = {n: sorted(generic_workflow.predecessors(n)) for n in generic_workflow}
        return cls(generic_workflow.name, config, out_prefix, parents)

    def write(self, out_prefix: str) -> None:
        with open(f"{out_prefix}/stepping.txt", "w") as fh:
            fh.write("\n".join(self.parents))


class SteppingService(BaseWmsService):  # type: ignore[misc]  # lsst ctrl_bps is untyped
    """Accepts ``cls(BpsConfig)`` and ``cls({})``, as BPS builds services."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        assert isinstance(config, (BpsConfig, dict)), type(config)

    def prepare(self, config: BpsConfig, generic_workflow: GenericWorkflow, out_prefix: str | None = None) -> SteppingWorkflow:
        path = out_prefix or config["submitPath"]
        wf = SteppingWorkflow.from_generic_workflow(config, generic_workflow, path, "support.wms.SteppingService")
        wf.write(path)
        return wf

    def submit(self, workflow: BaseWmsWorkflow, **kwargs: Any) -> None:
        assert isinstance(workflow, SteppingWorkflow)
        wms_id = f"step-{next(_IDS)}"
        with _LOCK:
            _RUNS[wms_id] = _Run(wms_id, workflow.name, workflow.submit_path, dict(workflow.parents),
                                 dict.fromkeys(workflow.parents, WmsStates.UNREADY))
        workflow.run_id = wms_id

    def report(self, wms_workflow_id: str | None = None, user: str | None = None, hist: float = 0,
               pass_thru: str | None = None, is_global: bool = False,
               return_exit_codes: bool = False) -> tuple[list[WmsRunReport], str]:
        if OUTAGE.is_set():
            raise ConnectionError("stepping WMS is down")
        if REPORT_BROKEN.is_set():
            raise RuntimeError("stepping WMS report broke")
        with _LOCK:
            if wms_workflow_id is None:
                return [self._summary(r) for r in _RUNS.values()], ""
            run = _RUNS.get(str(wms_workflow_id))
            if run is None:
                return [], f"no run {wms_workflow_id!r}"
            run.reports += 1
            rep = self._summary(run)
            rep.jobs = [WmsJobReport(wms_id=f"{run.wms_id}.{n}", name=n, label=n, state=s) for n, s in run.states.items()]
            self._step(run)  # the next report sees the jobs one step further
            return [rep], ""

    @staticmethod
    def _step(run: _Run) -> None:
        before = dict(run.states)
        for name, state in before.items():
            if state in _FINAL:
                continue
            parents = [before[p] for p in run.parents[name]]
            if any(p in (WmsStates.FAILED, WmsStates.PRUNED) for p in parents):
                run.states[name] = WmsStates.PRUNED
            elif state is WmsStates.RUNNING:
                fails = name.startswith("fail") and not run.restarted
                run.states[name] = WmsStates.FAILED if fails else WmsStates.SUCCEEDED
            elif state is WmsStates.UNREADY and not all(p is WmsStates.SUCCEEDED for p in parents):
                continue
            else:
                run.states[name] = _STEPS[_STEPS.index(state) + 1]

    @staticmethod
    def _summary(run: _Run) -> WmsRunReport:
        states = set(run.states.values())
        if states <= {WmsStates.SUCCEEDED}:
            state = WmsStates.SUCCEEDED
        elif WmsStates.DELETED in states and states <= _FINAL:
            state = WmsStates.DELETED
        elif states <= _FINAL:
            state = WmsStates.FAILED
        elif states <= {WmsStates.UNREADY}:
            state = WmsStates.PENDING
        else:
            state = WmsStates.RUNNING
        counts = {s: sum(1 for v in run.states.values() if v is s) for s in WmsStates}
        return WmsRunReport(wms_id=run.wms_id, path=run.path, label=run.name, run=run.name, operator="tester",
                            state=state, total_number_jobs=len(run.states), job_state_counts=counts,
                            run_summary=";".join(f"{n}:1" for n in run.states))

    def list_submitted_jobs(self, wms_id: str | None = None, user: str | None = None, require_bps: bool = True,
                            pass_thru: str | None = None, is_global: bool = False) -> list[str]:
        with _LOCK:
            return [i for i, r in _RUNS.items() if wms_id is None or i == wms_id]

    def cancel(self, wms_id: str, pass_thru: str | None = None) -> tuple[bool, str]:
        with _LOCK:
            run = _RUNS.get(str(wms_id))
            if run is None:
                return False, f"no run {wms_id!r}"
            for n, s in run.states.items():
                if s not in _FINAL:
                    run.states[n] = WmsStates.DELETED
            return True, ""

    def restart(self, wms_workflow_id: str) -> tuple[str | None, str | None, str]:
        with _LOCK:
            old = _RUNS.get(str(wms_workflow_id))
            if old is None:
                return None, None, f"no run {wms_workflow_id!r}"
            wms_id = f"step-{next(_IDS)}"
            states = {n: (s if s is WmsStates.SUCCEEDED else WmsStates.UNREADY) for n, s in old.states.items()}
            _RUNS[wms_id] = _Run(wms_id, old.name, old.path, dict(old.parents), states, restarted=True)
            return wms_id, old.name, ""

    def run_submission_checks(self) -> None:
        CHECKS_RUN.append(time.monotonic())
        if CHECKS_FAIL.is_set():
            raise RuntimeError("no proxy certificate found")

    def ping(self, pass_thru: str | None) -> tuple[int, str]:
        if OUTAGE.is_set():
            DOWN_PINGS.put(time.monotonic())
            return 1, "stepping WMS is down"
        return 0, ""


class OlderService(SteppingService):
    """A plugin written against an older BaseWmsService: its report() has no ``is_global`` or
    ``return_exit_codes``, and it has no submission checks."""

    def report(self, wms_workflow_id: str | None = None, user: str | None = None, hist: float = 0,  # type: ignore[override]  # the older signature on purpose
               pass_thru: str | None = None) -> tuple[list[WmsRunReport], str]:
        return super().report(wms_workflow_id, user, hist, pass_thru)

    def run_submission_checks(self) -> None:
        raise NotImplementedError


class NotAService:
    """Importable, but not a BaseWmsService."""


# -- a Parsl site whose executor cannot start: submit fails inside parsl.load ---------------------

from lsst.ctrl.bps.parsl.site import SiteConfig
from parsl.executors import ThreadPoolExecutor


class _RefusingExecutor(ThreadPoolExecutor):
    def start(self) -> None:
        raise RuntimeError("executor refuses to start")


class BrokenSite(SiteConfig):  # type: ignore[misc]  # lsst ctrl_bps_parsl is untyped
    """``site.<computeSite>.class`` whose executor raises at start (inside Parsl's load)."""

    def get_executors(self) -> list[Any]:
        return [_RefusingExecutor(label="local", max_threads=1)]

    def select_executor(self, job: Any) -> str:
        return "local"

    def get_address(self) -> str:
        return "127.0.0.1"
