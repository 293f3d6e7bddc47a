"""``flowbus demo`` end to end with real backends: a loopback ecflow_server, a QCG-PilotJob
manager, soma-workflow (light mode), the WMS (Parsl), and the guiServer emulator, on a private
broker and Ray.

The demo runs as ``flowbus demo --json`` under a small wrapper process that is a child
subreaper (``PR_SET_CHILD_SUBREAPER``): anything the demo started and left behind, even a
detached process, is re-parented to the wrapper, which reports it (and then ends it, by PID).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import pytest

from flowbus.demo import ecflow_missing

pytestmark = [pytest.mark.ray, pytest.mark.qcg]

#: the wrapper: run the demo, optionally SIGTERM it once a line appears on its stderr, then wait
#: (bounded) for every process re-parented to us to end; print one JSON object
WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, threading, time
import psutil

PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed")
argv, timeout, term_on, signum = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
out_chunks, err_lines, termed = [], [], threading.Event()

def read_out():
    out_chunks.append(proc.stdout.read())

def read_err():
    for line in proc.stderr:
        err_lines.append(line)
        if term_on and term_on in line and not termed.is_set():
            termed.set()
            proc.send_signal(signum)

readers = [threading.Thread(target=f, daemon=True) for f in (read_out, read_err)]
for r in readers:
    r.start()
timed_out = False
try:
    proc.wait(timeout)
except subprocess.TimeoutExpired:
    timed_out = True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
for r in readers:
    r.join(10)
out = "".join(out_chunks)

def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

def alive():
    reap()
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out

deadline = time.monotonic() + 30  # Ray's processes may take a moment to exit after shutdown
left = alive()
while left and time.monotonic() < deadline:
    psutil.wait_procs(left, timeout=0.5)
    left = alive()
names = []
for p in left:
    try:
        names.append(f"{p.pid}: {' '.join(p.cmdline())[:100]}")
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(left, timeout=5)
reap()
print(json.dumps({"code": proc.returncode, "timed_out": timed_out, "termed": termed.is_set(),
                  "stdout": out, "stderr": "".join(err_lines), "left": names}))
"""


def run_wrapped(args: list[str], timeout: float, term_on: str = "", signum: int = signal.SIGTERM,
                argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``flowbus demo ARGS`` (or ``argv``) under the wrapper; with ``term_on``, send ``signum``
    once that text appears on the demo's stderr."""
    argv = argv or [sys.executable, "-m", "flowbus", "demo", *args]
    done = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(argv), str(timeout), term_on, str(int(signum))],
                          capture_output=True, text=True, timeout=timeout + 240, env={**os.environ})
    assert done.returncode == 0, f"wrapper failed: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]  # parsed JSON


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def states(events: list[dict[str, Any]], backend: str, key: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "state" and e["backend"] == backend and (key is None or e["key"] == key)]


@pytest.fixture(scope="module")
def demo_run() -> dict[str, Any]:
    """One full run of ``flowbus demo --json`` (shared by the assertions below)."""
    if ecflow_missing():
        pytest.skip(f"the demo's recovery runs on ecFlow: {ecflow_missing()}")
    run = run_wrapped(["--json", "--timeout", "400"], timeout=500)
    run["events"] = json_lines(run["stdout"])
    summaries = [e for e in run["events"] if e.get("type") == "demo.summary"]
    run["summary"] = summaries[-1] if summaries else None
    return run


@pytest.mark.timeout(900)
class TestDemo:
    """The demo pipeline, its events, its recovery and its clean exit."""

    def test_exit_and_summary(self, demo_run: dict[str, Any]) -> None:
        """The demo exits 0 and its summary lists every stage as ok, in pipeline order."""
        assert not demo_run["timed_out"], demo_run["stderr"][-3000:]
        assert demo_run["code"] == 0, demo_run["stderr"][-3000:]
        summary = demo_run["summary"]
        assert summary is not None and summary["ok"] is True and summary["exit_code"] == 0
        rows = {s["stage"]: s for s in summary["stages"]}
        assert [s["stage"] for s in summary["stages"]] == [
            "ecflow-suite", "qcg-ensemble", "soma-workflow", "wms-workflow", "difx-job"]
        assert {name: r["result"] for name, r in rows.items()} == dict.fromkeys(rows, "ok"), summary
        assert all(r["events"] > 0 for r in rows.values()), summary
        assert rows["ecflow-suite"]["recoveries"] == 1
        assert sum(r["recoveries"] for r in rows.values()) == 1
        assert "all stages passed" not in demo_run["stdout"]  # --json: the table is JSON, not text
        assert not os.path.exists(summary["state_dir"]), "the private state dir is removed after success"

    def test_terminal_events(self, demo_run: dict[str, Any]) -> None:
        """Each stage's terminal event is in the JSON event stream, in pipeline order."""
        events = demo_run["events"]
        ecf = states(events, "ecflow", "/demo/ingest")
        assert ecf and ecf[-1]["state"] == "complete"
        assert states(events, "ecflow", "/demo/prepare")[-1]["state"] == "complete"
        qcg = states(events, "qcg", "ensemble")
        assert qcg[-1]["state"] == "complete" and qcg[-1]["native"] == "SUCCEED"
        iterations = {e["key"] for e in states(events, "qcg") if e["key"].startswith("ensemble:") and e["state"] == "complete"}
        assert iterations == {f"ensemble:{i}" for i in range(4)}
        soma_wf = [e for e in states(events, "soma") if "/" not in e["key"] and e["state"] == "complete"]
        assert len(soma_wf) == 1 and soma_wf[0]["native"] == "workflow_done"
        soma_jobs = {e["key"].split("/", 1)[1] for e in states(events, "soma") if "/" in e["key"] and e["state"] == "complete"}
        assert soma_jobs == {"split", "work_a", "work_b", "merge"}
        wms_wf = [e for e in states(events, "wms") if e["attrs"].get("kind") == "workflow" and e["state"] == "complete"]
        assert len(wms_wf) == 1 and wms_wf[0]["native"] == "SUCCEEDED"
        difx = states(events, "guiserver", "demo_1")
        assert difx[-1]["state"] == "complete" and difx[-1]["native"] == "ENDED_GRACEFULLY"
        progress = [e["value"] for e in events if e["type"] == "attr" and e["key"] == "demo_1" and e["kind"] == "progress"]
        assert len(progress) >= 5 and progress[-1] == 100.0 and progress == sorted(progress)

    def test_rules_chain_the_stages(self, demo_run: dict[str, Any]) -> None:
        """Each later stage is started by its rule, which fired once, after the previous stage ended."""
        events = demo_run["events"]
        fired = [e for e in events if e["type"] == "rule.fired"]
        assert [e["rule"] for e in fired] == [
            "suite-done-starts-ensemble", "ensemble-done-starts-workflows", "workflows-done-start-difx"]
        t = {e["rule"]: e["time"] for e in fired}
        ingest_done = states(events, "ecflow", "/demo/ingest")[-1]["time"]
        qcg = states(events, "qcg")
        soma, wms = states(events, "soma"), states(events, "wms")
        soma_done = max(e["time"] for e in soma if e["state"] == "complete" and "/" not in e["key"])
        wms_done = max(e["time"] for e in wms if e["state"] == "complete" and e["attrs"].get("kind") == "workflow")
        difx = states(events, "guiserver", "demo_1")
        assert ingest_done <= t["suite-done-starts-ensemble"] <= qcg[0]["time"]
        assert states(events, "qcg", "ensemble")[-1]["time"] <= t["ensemble-done-starts-workflows"]
        assert t["ensemble-done-starts-workflows"] <= min(soma[0]["time"], wms[0]["time"])
        assert max(soma_done, wms_done) <= t["workflows-done-start-difx"] <= difx[0]["time"]
        rows = {s["stage"]: s["started_by"] for s in demo_run["summary"]["stages"]}
        assert rows == {"ecflow-suite": "demo", "qcg-ensemble": "rule suite-done-starts-ensemble",
                        "soma-workflow": "rule ensemble-done-starts-workflows",
                        "wms-workflow": "rule ensemble-done-starts-workflows",
                        "difx-job": "rule workflows-done-start-difx"}

    def test_recovery_exactly_once(self, demo_run: dict[str, Any]) -> None:
        """/demo/ingest aborts once, the policy's one RecoveryAttempted (requeue) follows, then it completes."""
        events = demo_run["events"]
        rec = [e for e in events if e["type"] == "recovery.attempted"]
        assert len(rec) == 1, rec
        assert rec[0]["key"] == "ops//demo/ingest" and rec[0]["ok"] is True and rec[0]["source"] == "orchestrator"
        assert "requeue-aborted-demo-tasks" in rec[0]["detail"] and "requeue" in rec[0]["detail"]
        assert not [e for e in events if e["type"] == "recovery.gave_up"]
        ingest = states(events, "ecflow", "/demo/ingest")
        aborts = [e for e in ingest if e["state"] == "aborted"]
        assert len(aborts) == 1
        assert aborts[0]["time"] <= rec[0]["time"] <= ingest[-1]["time"] and ingest[-1]["state"] == "complete"

    def test_nothing_left_behind(self, demo_run: dict[str, Any]) -> None:
        """No process the demo started outlives it (servers, managers, Ray, broker, jobs)."""
        assert demo_run["left"] == []
        assert "stopped" in demo_run["stderr"]


@pytest.mark.timeout(600)
class TestDemoStopped:
    """SIGTERM or Ctrl-C in the middle of a run still ends everything the demo started."""

    @pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
    def test_signal(self, signum: int, code: int) -> None:
        """The signal once the sessions are up: its exit code, a summary, and no process left."""
        run = run_wrapped(["--json", "--timeout", "300"], timeout=360, term_on="sessions up", signum=signum)
        assert run["termed"], run["stderr"][-3000:]
        assert run["code"] == code, run["stderr"][-3000:]
        assert run["left"] == [], run["left"]
        summary = [e for e in json_lines(run["stdout"]) if e.get("type") == "demo.summary"]
        assert summary and summary[-1]["ok"] is False and summary[-1]["exit_code"] == code
        assert not os.path.exists(summary[-1]["state_dir"]), "a run stopped on purpose leaves no state dir"


#: the demo with an ecFlow task that always fails: the policy gives up, --keep-going goes on
ALWAYS_FAILING = r"""
import sys
import flowbus.demo as demo
demo.ECF_SCRIPTS["ingest"] = "sleep 0.3\necho always failing\nexit 1\n"
sys.exit(demo.run_demo(as_json=True, keep_going=True, timeout=300))
"""


@pytest.mark.timeout(600)
class TestDemoFailure:
    """A stage that cannot be recovered: the policy gives up, the exit code says so."""

    def test_gave_up_keep_going(self) -> None:
        """Two requeues then RecoveryGaveUp; exit 1; --keep-going starts the next stage itself and
        the rules chain the rest, each once; the state dir is kept; no process is left."""
        if ecflow_missing():
            pytest.skip(ecflow_missing())
        run = run_wrapped([], timeout=400, argv=[sys.executable, "-c", ALWAYS_FAILING])
        events = json_lines(run["stdout"])
        summary = [e for e in events if e.get("type") == "demo.summary"]
        assert summary, run["stderr"][-3000:]
        state_dir = summary[-1]["state_dir"]
        try:
            assert run["code"] == 1 and summary[-1]["exit_code"] == 1, run["stderr"][-3000:]
            rows = {r["stage"]: r for r in summary[-1]["stages"]}
            assert rows["ecflow-suite"]["result"] == "failed" and "gave up" in rows["ecflow-suite"]["detail"]
            assert rows["ecflow-suite"]["recoveries"] == 2
            assert {n: r["result"] for n, r in rows.items() if n != "ecflow-suite"} == dict.fromkeys(
                ["qcg-ensemble", "soma-workflow", "wms-workflow", "difx-job"], "ok")
            assert rows["qcg-ensemble"]["started_by"] == "demo"
            assert rows["difx-job"]["started_by"] == "rule workflows-done-start-difx"
            attempts = [e for e in events if e["type"] == "recovery.attempted"]
            assert [e["attempt"] for e in attempts] == [1, 2]
            gave_up = [e for e in events if e["type"] == "recovery.gave_up"]
            assert len(gave_up) == 1 and gave_up[0]["key"] == "ops//demo/ingest"
            aborts = [e for e in states(events, "ecflow", "/demo/ingest") if e["state"] == "aborted"]
            assert len(aborts) == 3
            fired = [e["rule"] for e in events if e["type"] == "rule.fired"]
            assert fired == ["ensemble-done-starts-workflows", "workflows-done-start-difx"]
            assert len([e for e in states(events, "qcg", "ensemble") if e["state"] == "queued"]) == 1
            assert not [e for e in events if e["type"] == "error"], "nothing was started twice"
            assert os.path.isdir(state_dir), "a failed run keeps its state dir for inspection"
            assert run["left"] == []
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
