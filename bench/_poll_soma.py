"""soma-workflow polling benchmark, called by ``bench/poll_backends.py`` (``measure()``).

Everything is real: a ``SomaSession`` (light mode, its own temporary directory, the config's
default ``poll-interval`` and ``engine-refresh``) polled by a thread the way the actor polls it.

* Latency: independent jobs ``sh -c 'sleep <t>; date +%s.%N >file'`` with staggered ``t``. A
  job's change time is the timestamp it wrote as its last act (its exit follows within a few
  ms); detection = wall time when the session emitted the job's final ``StateChanged`` minus
  that timestamp. In the same run, one thread per job waits with soma's own
  ``wait_job([id])`` (through the session's ``call``): the baseline is its return time minus the
  same timestamp. soma's waits poll every ``soma_workflow.engine.refreshment_interval`` (1 s,
  soma's default: the session lowers only its own engine loop period, at construction).
* CPU: W workflows kept in progress (each a ``sleep 600`` job and two jobs after it), watched
  for a window. ``poll_cpu_s_per_wf_s`` is the CPU of the polling thread alone
  (``time.thread_time`` around each ``poll()``) per workflow per second;
  ``process_cpu_s_per_wf_s`` is the whole process (soma's engine and scheduler threads
  included) over the same window, per workflow per second.

Returns (all floats): ``soma_p50_ms``, ``soma_p99_ms``, ``soma_wait_p50_ms``,
``soma_wait_p99_ms``, ``soma_jobs``, ``soma_poll_interval_s``, ``soma_workflows``,
``soma_poll_cpu_s_per_wf_s``, ``soma_process_cpu_s_per_wf_s``, ``soma_polls_per_s``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any

from _common import Poller, percentile
from flowbus.schemas import SomaSessionConfig, StateChanged
from flowbus.services.soma import SomaSession


def _latency(quick: bool, tmp: str) -> dict[str, float]:
    n = 8 if quick else 30
    emitted: dict[str, float] = {}
    cond = threading.Condition()

    def emit(ev: Any) -> None:
        if isinstance(ev, StateChanged) and ev.state.final and "/" in ev.key:
            with cond:
                emitted.setdefault(ev.key, time.time())
                cond.notify_all()

    cfg = SomaSessionConfig(name="bench-lat", directory=os.path.join(tmp, "lat"), proc_nb=n)
    session = SomaSession(cfg)
    session.start(emit, {})
    waits: dict[str, float] = {}
    try:
        stamps = {f"j{i}": os.path.join(tmp, f"end{i}") for i in range(n)}
        jobs = [{"name": name, "command": ["sh", "-c", f"sleep {0.5 + 0.137 * i:.3f}; date +%s.%N >{path}"]}
                for i, (name, path) in enumerate(stamps.items())]
        with Poller(session, "bench-soma-poll") as poller:
            wf = session.call("submit_workflow", {"name": "lat", "jobs": jobs})
            ids = session.call("job_ids", wf)

            def wait_one(name: str) -> None:
                session.call("wait_job", [ids[name]], timeout=120)
                waits[name] = time.time()

            waiters = [threading.Thread(target=wait_one, args=(name,), daemon=True) for name in stamps]
            for t in waiters:
                t.start()
            deadline = time.monotonic() + 180
            with cond:
                cond.wait_for(lambda: len(emitted) >= n, max(0.0, deadline - time.monotonic()))
            for t in waiters:
                t.join(max(0.1, deadline - time.monotonic()))
            if poller.errors:
                raise RuntimeError(f"soma bench: poll raised {poller.errors[0]!r}")
        ends = {}
        for name, path in stamps.items():
            with open(path) as f:
                ends[name] = float(f.read().strip())
        ours = [1000.0 * (emitted[f"{wf}/{k}"] - t) for k, t in ends.items() if f"{wf}/{k}" in emitted]
        theirs = [1000.0 * (waits[k] - t) for k, t in ends.items() if k in waits]
        if len(ours) < n or len(theirs) < n:
            raise RuntimeError(f"soma bench: {len(ours)}/{n} jobs seen by the session, {len(theirs)}/{n} by wait_job")
    finally:
        session.stop()
    return {"soma_p50_ms": percentile(ours, 50), "soma_p99_ms": percentile(ours, 99), "soma_wait_p50_ms": percentile(theirs, 50),
            "soma_wait_p99_ms": percentile(theirs, 99), "soma_jobs": float(n),
            "soma_poll_interval_s": float(cfg.poll_interval)}


def _cpu(quick: bool, tmp: str) -> dict[str, float]:
    w = 10 if quick else 50
    window = 3.0 if quick else 10.0
    session = SomaSession(SomaSessionConfig(name="bench-cpu", directory=os.path.join(tmp, "cpu")))
    session.start(lambda ev: None, {})
    try:
        for i in range(w):
            session.call("submit_workflow", {"name": f"w{i}", "jobs": [
                {"name": "long", "command": ["sleep", "600"]},
                {"name": "b", "command": ["true"], "after": ["long"]},
                {"name": "c", "command": ["true"], "after": ["b"]}]})
        with Poller(session, "bench-soma-poll") as poller:
            threading.Event().wait(1.0)  # let the engine pick the workflows up
            cpu0, proc0, polls0, t0 = poller.cpu, time.process_time(), poller.polls, time.monotonic()
            threading.Event().wait(window)
            cpu1, proc1, polls1, t1 = poller.cpu, time.process_time(), poller.polls, time.monotonic()
            if poller.errors:
                raise RuntimeError(f"soma bench: poll raised {poller.errors[0]!r}")
    finally:
        session.stop()
    span = t1 - t0
    return {"soma_workflows": float(w), "soma_poll_cpu_s_per_wf_s": (cpu1 - cpu0) / (w * span),
            "soma_process_cpu_s_per_wf_s": (proc1 - proc0) / (w * span), "soma_polls_per_s": (polls1 - polls0) / span}


def measure(quick: bool = True) -> dict[str, float]:
    """Detection latency (session vs soma's wait_job) and watching CPU; see the module docstring."""
    tmp = tempfile.mkdtemp(prefix="flowbus-bench-soma-")
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
