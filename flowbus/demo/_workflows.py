"""The demo's workflow stage: one WorkflowSpec to soma-workflow and one to the WMS (Parsl), both
submitted at once, then both awaited (each by its workflow key, which the submit returns; a wait
looks at the current state first, so a workflow that already ended is not missed)."""

from __future__ import annotations

import time
from typing import Any

from flowbus.bus import Match
from flowbus.schemas import FlowbusError, State, StateChanged, WaitTimeout

from ._stages import Ctx, workflow_spec
from ._view import StageResult


def _jobs_done(ctx: Ctx, backend: str, source: str, prefix: str) -> int:
    """Jobs of a workflow whose current state (the broker's snapshot) is complete."""
    return sum(1 for e in ctx.client.status(f"{backend}/{source}/state/{prefix}")
               if isinstance(e, StateChanged) and e.state is State.COMPLETE)


def _judge(ctx: Ctx, st: StageResult, ev: Any, backend: str, source: str, key: str, t0: float) -> None:
    n = _jobs_done(ctx, backend, source, key + "/")
    if isinstance(ev, StateChanged) and ev.state is State.COMPLETE:
        st.result, st.detail = "ok", f"workflow {key.rsplit('/', 1)[-1]} {ev.native}; {n} jobs complete"
    else:
        st.result, st.detail = "failed", f"workflow {key} {getattr(ev, 'native', '?')}"
    st.duration = time.monotonic() - t0
    st.ended_ns = time.time_ns()


def _submit_wms(ctx: Ctx, spec: dict[str, Any]) -> str:
    """The WMS session's WorkflowSpec operation; returns the workflow's wms id (its key)."""
    result = ctx.call("wms", "submit_workflow", spec)
    if isinstance(result, dict):
        return str(result.get("wms_id") or result.get("id"))
    return str(result)


def _workflow_match(session: str, key: str | None) -> Match:
    """The workflow's final state: by key when we submitted it, else any workflow-level event of
    the session (a rule submitted it)."""
    if key is not None:
        return Match(f"{session}/{session}/state/{key} final=true")
    if session == "soma":  # workflow keys are ids; job keys are <id>/<job>
        return Match("soma/soma/state/* final=true", lambda e: "/" not in e.key)
    return Match("wms/wms/state/* final=true",
                 lambda e: isinstance(e, StateChanged) and e.attrs.get("kind") == "workflow")


def submit_and_wait(ctx: Ctx, soma: StageResult | None, wms: StageResult | None, kick: bool) -> None:
    t0 = time.monotonic()
    keys: dict[str, str | None] = {}
    for st in (soma, wms):
        if st is not None:
            st.started_ns = time.time_ns()
    if not kick:
        names = " and ".join(n for n, st in (("soma-workflow", soma), ("WMS", wms)) if st is not None)
        ctx.step(f"{names}: waiting for rule ensemble-done-starts-workflows to submit them")
        keys = {"soma": None, "wms": None}
    else:
        try:
            if soma is not None:
                keys["soma"] = str(ctx.call("soma", "submit_workflow", workflow_spec("demo-soma")))
                ctx.step(f"soma-workflow: submitted workflow {keys['soma']} (4 jobs, a diamond)")
        except FlowbusError as exc:
            assert soma is not None
            soma.result, soma.detail = "failed", str(exc)[:200]
        try:
            if wms is not None:
                keys["wms"] = _submit_wms(ctx, workflow_spec("demo-wms"))
                ctx.step(f"WMS (Parsl): submitted workflow {keys['wms']} (4 jobs, a diamond)")
        except FlowbusError as exc:
            assert wms is not None
            wms.result, wms.detail = "failed", str(exc)[:200]
    for st, session in ((soma, "soma"), (wms, "wms")):
        if st is None or session not in keys:
            continue
        try:
            ev = ctx.client.wait(_workflow_match(session, keys[session]), timeout=ctx.left(180))
            ctx.view.wait_seen(ev)
            _judge(ctx, st, ev, session, session, ev.key, t0)
        except WaitTimeout as exc:
            st.result, st.detail = "failed", f"timed out: {exc}"
        st.duration = st.duration or time.monotonic() - t0
        st.ended_ns = st.ended_ns or time.time_ns()
        ctx.step(f"stage {st.stage}: {st.result} ({st.duration:.1f} s) {st.detail}")
