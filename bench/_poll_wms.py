"""ctrl_bps WMS (Parsl) polling benchmark, called by ``bench/poll_backends.py`` (``measure()``).

Everything is real: a ``WmsSession`` with ``lsst.ctrl.bps.parsl.ParslService`` and the
socket-free ``LocalThreads`` site, at the config's default ``poll-interval``, polled by a thread
the way the actor polls it.

* Latency: one workflow of independent jobs ``sh -c 'sleep <t>; date +%s.%N >file'`` with
  staggered ``t`` (as many threads as jobs). A job's change time is the timestamp it wrote as its
  last act; detection = wall time when the session emitted the job's final ``StateChanged`` minus
  that timestamp. The session hooks each job's future when a poll first sees it, so a job's end
  is published from Parsl's own completion callback (``observed=push``); the poll every
  ``poll-interval`` catches the rest (a job starting). Baselines in the same run: Parsl's own notification, a done-callback on each
  job's ``AppFuture`` (``wms_future_*``), and the return of ParslService's blocking ``submit()``
  minus the last job's timestamp (``wms_submit_return_ms``: what a caller of ``submit`` sees).
* CPU: W workflows of 10 ``sleep 600`` jobs each; Parsl runs one workflow per process at a time,
  so one is RUNNING and W-1 are queued (PENDING). ``poll_cpu_s_per_wf_s`` is the CPU of the
  polling thread alone (``time.thread_time`` around each ``poll()``) per workflow per second;
  ``process_cpu_s_per_wf_s`` is the whole process (Parsl's threads included) over the same
  window per workflow per second; ``poll_cpu_s_per_running_wf_s`` charges the poll CPU to the
  one running workflow only.

Returns (all floats): ``wms_p50_ms``, ``wms_p99_ms``, ``wms_future_p50_ms``,
``wms_future_p99_ms``, ``wms_submit_return_ms``, ``wms_jobs``, ``wms_poll_interval_s``,
``wms_workflows``, ``wms_poll_cpu_s_per_wf_s``, ``wms_poll_cpu_s_per_running_wf_s``,
``wms_process_cpu_s_per_wf_s``, ``wms_polls_per_s``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any

from _common import Poller, percentile
from flowbus.schemas import StateChanged, WmsSessionConfig
from flowbus.services.wms import WmsSession


def _latency(quick: bool, tmp: str) -> dict[str, float]:
    n = 8 if quick else 30
    emitted: dict[str, float] = {}
    cond = threading.Condition()

    def emit(ev: Any) -> None:
        if isinstance(ev, StateChanged) and ev.state.final and ev.attrs.get("kind") == "job":
            with cond:
                emitted.setdefault(str(ev.attrs.get("name")), time.time())
                cond.notify_all()

    cfg = WmsSessionConfig(name="bench-lat", submit_dir=os.path.join(tmp, "lat"), cores=n)
    session = WmsSession(cfg)
    session.start(emit, {})
    returned: list[float] = []
    service = session._service  # the bench times the plugin's own blocking submit
    plain_submit = service.submit

    def timed_submit(workflow: Any, **kwargs: Any) -> Any:
        try:
            return plain_submit(workflow, **kwargs)
        finally:
            returned.append(time.time())

    service.submit = timed_submit
    futures_done: dict[str, float] = {}
    try:
        stamps = {f"j{i}": os.path.join(tmp, f"end{i}") for i in range(n)}
        jobs = [{"name": name, "command": ["sh", "-c", f"sleep {0.5 + 0.137 * i:.3f}; date +%s.%N >{path}"]}
                for i, (name, path) in enumerate(stamps.items())]
        with Poller(session, "bench-wms-poll") as poller:
            wid = session.call("submit_workflow", {"name": "lat", "jobs": jobs})["wms_id"]
            run = session._runs[wid]
            hooked: set[str] = set()
            deadline = time.monotonic() + 60
            while len(hooked) < n and time.monotonic() < deadline:  # futures appear once run() starts
                for name, job in run.wf.jobs.items():
                    if name not in hooked and job.future is not None:
                        job.future.add_done_callback(lambda _f, k=name: futures_done.setdefault(k, time.time()))
                        hooked.add(name)
                time.sleep(0.005)
            deadline = time.monotonic() + 180
            with cond:
                cond.wait_for(lambda: len(emitted) >= n, max(0.0, deadline - time.monotonic()))
            while not returned and time.monotonic() < deadline:
                time.sleep(0.01)
            if poller.errors:
                raise RuntimeError(f"wms bench: poll raised {poller.errors[0]!r}")
        ends = {}
        for name, path in stamps.items():
            with open(path) as f:
                ends[name] = float(f.read().strip())
        ours = [1000.0 * (emitted[k] - t) for k, t in ends.items() if k in emitted]
        parsl = [1000.0 * (futures_done[k] - t) for k, t in ends.items() if k in futures_done]
        if len(ours) < n or not returned:
            raise RuntimeError(f"wms bench: {len(ours)}/{n} jobs seen by the session; submit returned: {bool(returned)}")
    finally:
        session.stop()
    return {"wms_p50_ms": percentile(ours, 50), "wms_p99_ms": percentile(ours, 99), "wms_future_p50_ms": percentile(parsl, 50),
            "wms_future_p99_ms": percentile(parsl, 99), "wms_submit_return_ms": 1000.0 * (returned[0] - max(ends.values())),
            "wms_jobs": float(n), "wms_poll_interval_s": float(cfg.poll_interval)}


def _cpu(quick: bool, tmp: str) -> dict[str, float]:
    w = 5 if quick else 20
    window = 3.0 if quick else 10.0
    session = WmsSession(WmsSessionConfig(name="bench-cpu", submit_dir=os.path.join(tmp, "cpu"), cores=10))
    session.start(lambda ev: None, {})
    try:
        for i in range(w):
            session.call("submit_workflow", {"name": f"w{i}", "jobs": [
                {"name": f"s{j}", "command": ["sleep", "600"]} for j in range(10)]})
        with Poller(session, "bench-wms-poll") as poller:
            threading.Event().wait(1.0)  # let the first workflow start
            cpu0, proc0, polls0, t0 = poller.cpu, time.process_time(), poller.polls, time.monotonic()
            threading.Event().wait(window)
            cpu1, proc1, polls1, t1 = poller.cpu, time.process_time(), poller.polls, time.monotonic()
            if poller.errors:
                raise RuntimeError(f"wms bench: poll raised {poller.errors[0]!r}")
    finally:
        session.stop()
    span = t1 - t0
    return {"wms_workflows": float(w), "wms_poll_cpu_s_per_wf_s": (cpu1 - cpu0) / (w * span),
            "wms_poll_cpu_s_per_running_wf_s": (cpu1 - cpu0) / span,
            "wms_process_cpu_s_per_wf_s": (proc1 - proc0) / (w * span), "wms_polls_per_s": (polls1 - polls0) / span}


def measure(quick: bool = True) -> dict[str, float]:
    """Detection latency (session vs Parsl's futures and blocking submit) and watching CPU."""
    tmp = tempfile.mkdtemp(prefix="flowbus-bench-wms-")
    try:
        out = _latency(quick, tmp)
        out.update(_cpu(quick, tmp))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure(quick="--full" not in sys.argv), indent=1))
