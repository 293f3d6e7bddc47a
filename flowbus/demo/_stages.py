"""The demo pipeline's stages: what each submits, what terminal event it waits for, and how its
result is judged. Each stage is armed before it acts (``client.expect``) and bounded in time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from flowbus.bus import Match
from flowbus.schemas import AttributeChanged, FlowbusError, RecoveryGaveUp, State, StateChanged, WaitTimeout

from ._servers import LoopbackEcflowServer
from ._view import LiveView, StageResult

log = structlog.get_logger("flowbus.demo")

ECF_SUITE = "demo"
#: ``ingest`` fails on its first try (a flag file remembers it) and is requeued by the policy
ECF_BODY = """\
task prepare
task ingest
  trigger prepare == complete
"""
#: the job script of each task, by name; read when the suite is written (a test swaps one for a
#: task that always fails)
ECF_SCRIPTS = {
    "prepare": "echo 'prepare: staging inputs'\nsleep 0.3\n",
    "ingest": """\
        sleep 0.3  # a task that takes a moment (and each try is seen active)
        flag=%ECF_HOME%/ingest.failed-once
        if [ ! -e "$flag" ]; then
          touch "$flag"
          echo 'ingest: failing on purpose (first try)'
          exit 1
        fi
        echo 'ingest: ok (try %ECF_TRYNO%)'
        """,
}
ECF_FAILING = f"/{ECF_SUITE}/ingest"

QCG_JOB = "ensemble"
QCG_ITERATIONS = 4
QCG_JOB_SPEC: dict[str, Any] = {"name": QCG_JOB, "exec": "/bin/echo", "args": ["ensemble member ${it}"],
                                "iteration": QCG_ITERATIONS}

DIFX_DIR = "/data/demo"
DIFX_JOB = "demo_1"
DIFX_INPUT = f"{DIFX_DIR}/{DIFX_JOB}.input"
DIFX_TICKS = 10


def workflow_spec(name: str) -> dict[str, Any]:
    """A small WorkflowSpec description (shared by soma-workflow and the WMS)."""
    return {"name": name, "jobs": [
        {"name": "split", "command": ["/bin/echo", f"{name}: split"]},
        {"name": "work_a", "command": ["/bin/echo", f"{name}: work a"], "after": ["split"]},
        {"name": "work_b", "command": ["/bin/echo", f"{name}: work b"], "after": ["split"]},
        {"name": "merge", "command": ["/bin/echo", f"{name}: merge"], "after": ["work_a", "work_b"]},
    ]}


@dataclass
class Ctx:
    """What the stages share: the bus client, a way to call sessions, the deadline."""

    client: Any
    call_session: Callable[..., Any]
    view: LiveView
    step: Callable[[str], None]
    deadline: float
    work: Path
    sessions: set[str]
    ecf: LoopbackEcflowServer | None = None
    emu: Any = None
    #: the Orchestrator's rules chain the stages: a stage only acts when ``kick`` says so
    rules: bool = False

    def left(self, cap: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout("the demo's --timeout", 0.0)
        return min(cap, left)

    def call(self, session: str, operation: str, *args: Any, **kwargs: Any) -> Any:
        return self.call_session(session, operation, *args, **kwargs)


def _final_state(ev: Any) -> State | None:
    return ev.state if isinstance(ev, StateChanged) else None


# -- ecFlow ------------------------------------------------------------------------------------------


def _ingest_settled(ev: Any) -> bool:
    """The failing task completed, or the policy gave up on it."""
    if isinstance(ev, StateChanged):
        return (ev.backend, ev.source, ev.key, ev.state) == ("ecflow", "ops", ECF_FAILING, State.COMPLETE)
    return isinstance(ev, RecoveryGaveUp) and ev.key.endswith(ECF_FAILING)


def ecflow_stage(ctx: Ctx, st: StageResult) -> None:
    """Load and begin a two-task suite; done when its last task is complete (after one requeue)."""
    assert ctx.ecf is not None
    text = ctx.ecf.write_suite(ECF_SUITE, ECF_BODY, ECF_SCRIPTS)
    limit = ctx.left(120)
    try:
        with ctx.client.expect(Match("*", _ingest_settled), timeout=limit) as w:
            ctx.call("ops", "load", text)
            ctx.call("ops", "begin_suite", ECF_SUITE)
            ctx.step(f"ecFlow: suite /{ECF_SUITE} loaded and begun on 127.0.0.1:{ctx.ecf.port}; "
                     f"{ECF_FAILING} fails on its first try")
    except WaitTimeout:
        raise WaitTimeout(f"{ECF_FAILING} complete (or the policy giving up)", limit) from None
    ctx.view.wait_seen(w.event)
    if isinstance(w.event, RecoveryGaveUp):
        st.result, st.detail = "failed", f"recovery gave up: {w.event.reason}"[:200]
        return
    st.result = "ok"
    tasks = [e for e in ctx.client.status(f"ecflow/ops/state//{ECF_SUITE}/") if isinstance(e, StateChanged)]
    done = sum(1 for e in tasks if e.state is State.COMPLETE)
    st.detail = f"/{ECF_SUITE}: {done}/{len(tasks)} tasks complete"


# -- QCG ---------------------------------------------------------------------------------------------


def qcg_stage(ctx: Ctx, st: StageResult, kick: bool) -> None:
    """A QCG-PilotJob job of N iterations; done when the job (all iterations) succeeded."""
    with ctx.client.expect(f"qcg/local/state/{QCG_JOB} final=true", timeout=ctx.left(120)) as w:
        if kick:
            ctx.call("local", "submit", [QCG_JOB_SPEC])
            ctx.step(f"QCG: submitted {QCG_JOB!r} with {QCG_ITERATIONS} iterations")
        else:
            ctx.step(f"QCG: waiting for rule suite-done-starts-ensemble to submit {QCG_JOB!r}")
    ctx.view.wait_seen(w.event)
    done = [e for e in ctx.client.status(f"qcg/local/state/{QCG_JOB}:")
            if isinstance(e, StateChanged) and e.state is State.COMPLETE]
    if _final_state(w.event) is State.COMPLETE:
        st.result = "ok"
        st.detail = f"{QCG_ITERATIONS} iterations succeeded" if len(done) >= QCG_ITERATIONS else \
            f"job complete ({len(done)}/{QCG_ITERATIONS} iteration events seen)"
    else:
        st.result = "failed"
        st.detail = f"{QCG_JOB} {getattr(w.event, 'native', '?')}"


# -- soma-workflow and the WMS -------------------------------------------------------------------------


def workflow_stages(ctx: Ctx, soma: StageResult | None, wms: StageResult | None, kick: bool) -> None:
    """Submit one WorkflowSpec to soma-workflow and one to the WMS (Parsl), then wait for both."""
    from ._workflows import submit_and_wait

    submit_and_wait(ctx, soma, wms, kick)


# -- DiFX ----------------------------------------------------------------------------------------------


def prepare_difx(emu: Any) -> None:
    """The job's .input in the emulator's sandbox (it must exist before a rule starts the job)."""
    emu.real(DIFX_INPUT).parent.mkdir(parents=True, exist_ok=True)
    emu.real(DIFX_INPUT).write_text("# demo job (the emulator runs nothing)\n")


def difx_stage(ctx: Ctx, st: StageResult, kick: bool) -> None:
    """A DiFX job on the guiServer emulator, with progress; done when it ended gracefully."""
    with ctx.client.expect(f"guiserver/difx/state/{DIFX_JOB} final=true", timeout=ctx.left(120)) as w:
        if kick:
            ctx.call("difx", "start_job", DIFX_INPUT)
            ctx.step(f"DiFX: started {DIFX_INPUT} on the guiServer emulator at {ctx.emu.address}")
        else:
            ctx.step(f"DiFX: waiting for rule workflows-done-start-difx to start {DIFX_INPUT}")
    ctx.view.wait_seen(w.event)
    progress = [e.value for e in ctx.view.snapshot() if isinstance(e, AttributeChanged)
                and e.source == "difx" and e.key == DIFX_JOB and e.kind == "progress"]
    ev = w.event
    if _final_state(ev) is State.COMPLETE:
        st.result = "ok"
        st.detail = f"{getattr(ev, 'native', '')}; {len(progress)} progress updates"
    else:
        st.result = "failed"
        st.detail = f"{getattr(ev, 'native', '?')} {getattr(ev, 'detail', '')}".strip()


def run_stage(ctx: Ctx, st: StageResult, body: Callable[[], None]) -> None:
    """Time one stage and turn its errors into a failed row (KeyboardInterrupt and the like pass)."""
    st.started_ns = time.time_ns()
    t0 = time.monotonic()
    try:
        body()
    except WaitTimeout as exc:
        st.result, st.detail = "failed", f"timed out: {exc}"
    except FlowbusError as exc:
        st.result, st.detail = "failed", str(exc)[:200]
    finally:
        st.duration = time.monotonic() - t0
        st.ended_ns = time.time_ns()
    ctx.step(f"stage {st.stage}: {st.result} ({st.duration:.1f} s) {st.detail}")
