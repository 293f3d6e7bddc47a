"""``flowbus demo``: one cross-backend pipeline, end to end, on a private embedded stack.

It starts everything it needs in a private state directory (a broker on ipc sockets in it,
a loopback Ray, the Supervisor and the Orchestrator, and its own servers: an ``ecflow_server``
on 127.0.0.1 when ecFlow is installed, and the guiServer emulator), shows every event live,
begins the first stage, and lets the Orchestrator's rules (``_rules.py``) chain the rest:

    ecFlow suite (one task fails once; a recovery policy requeues it)
      -> QCG-PilotJob ensemble of N iterations
      -> a soma-workflow workflow and a WMS (Parsl) workflow, from WorkflowSpec descriptions
      -> a DiFX job on the emulator, with progress

It ends with a summary table (exit 0, or 1 when a stage failed) and stops every process it
started, also on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog

from flowbus.schemas import (
    EcflowSessionConfig,
    FlowbusConfig,
    FlowbusError,
    GuiserverSessionConfig,
    QcgSessionConfig,
    SessionConfig,
)

from ._servers import LoopbackEcflowServer, ecflow_missing
from ._stages import (
    DIFX_JOB,
    DIFX_TICKS,
    ECF_FAILING,
    QCG_JOB,
    Ctx,
    difx_stage,
    ecflow_stage,
    prepare_difx,
    qcg_stage,
    run_stage,
)
from ._view import LiveView, StageResult, print_summary

log = structlog.get_logger("flowbus.demo")


class _Stopped(BaseException):
    """SIGTERM arrived: unwind to the cleanup (like KeyboardInterrupt for SIGINT)."""


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise _Stopped(signum)


def _step(msg: str) -> None:
    print(f"flowbus demo: {msg}", file=sys.stderr, flush=True)


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _stages(has_ecflow: bool, has_soma: bool, has_wms: bool) -> list[StageResult]:
    out = [StageResult("ecflow-suite", "ecflow", sources=[("ecflow", "ops")], recovery_keys=[ECF_FAILING]),
           StageResult("qcg-ensemble", "qcg", sources=[("qcg", "local")], recovery_keys=[QCG_JOB]),
           StageResult("soma-workflow", "soma", sources=[("soma", "soma")]),
           StageResult("wms-workflow", "wms", sources=[("wms", "wms")]),
           StageResult("difx-job", "guiserver", sources=[("guiserver", "difx")], recovery_keys=[DIFX_JOB])]
    why = {"ecflow-suite": "" if has_ecflow else ecflow_missing(),
           "soma-workflow": "" if has_soma else "no soma-workflow backend in this flowbus (flowbus.services.soma)",
           "wms-workflow": "" if has_wms else "no WMS backend in this flowbus (flowbus.services.wms)"}
    for st in out:
        if why.get(st.stage):
            st.result, st.detail = "skipped", why[st.stage]
    return out


def _config(state: Path, ecf_port: int | None, difx_port: int, has_soma: bool, has_wms: bool) -> FlowbusConfig:
    sessions: list[SessionConfig] = [QcgSessionConfig(name="local", wd=str(state / "qcg"), actor="demo")]
    if ecf_port is not None:
        sessions.append(EcflowSessionConfig(name="ops", host="127.0.0.1", port=ecf_port, restart_halted=True,
                                            actor="demo"))
    sessions.append(GuiserverSessionConfig(name="difx", host="127.0.0.1", port=difx_port, allowed_dirs=["/data"],
                                           reconnect_backoff=0.1, actor="demo"))
    raw: dict[str, Any] = {"state-dir": str(state), "bus": {"journal-dir": str(state / "journal")},
                           "ray": {"namespace": "flowbus-demo"},
                           "sessions": [msgspec.to_builtins(s) for s in sessions]}
    if has_soma:
        raw["sessions"].append({"backend": "soma", "name": "soma", "actor": "workflows",
                                "directory": str(state / "soma"), "poll-interval": 0.1})
    if has_wms:
        raw["sessions"].append({"backend": "wms", "name": "wms", "actor": "workflows",
                                "submit-dir": str(state / "wms")})
    from ._rules import rules_and_policies

    raw["rules"], raw["policies"] = rules_and_policies(ecf_port is not None, has_soma, has_wms)
    from flowbus.schemas import parse_config

    return parse_config(raw, "<flowbus demo>")


def run_demo(*, as_json: bool = False, keep_going: bool = False, timeout: float = 300.0) -> int:
    """Run the pipeline once; 0 when every stage that ran succeeded, 1 otherwise."""
    from flowbus.bus import BrokerProcess, Client
    from flowbus.services.guiserver_emulator import GuiserverEmulator

    t_start = time.monotonic()
    deadline = t_start + timeout
    # inside the private state dir (0700), not the shared temp space: removed at the end, and a
    # failed run's, kept for inspection, is no one else's to read
    state = Path(tempfile.mkdtemp(prefix="demo-", dir=FlowbusConfig().state_path()))
    has_ecflow = not ecflow_missing()
    has_soma = _available("flowbus.services.soma") and _available("soma_workflow")
    has_wms = _available("flowbus.services.wms") and _available("parsl")
    stages = _stages(has_ecflow, has_soma, has_wms)
    by_name = {s.stage: s for s in stages}
    out = sys.stdout
    old_term = signal.signal(signal.SIGTERM, _raise_stopped)
    broker: BrokerProcess | None = None
    ecf: LoopbackEcflowServer | None = None
    emu: GuiserverEmulator | None = None
    ray_started = False
    supervisor: Any = None
    client: Client | None = None
    view: LiveView | None = None
    orchestrator: Any = None
    failed_setup = ""
    code = 1
    try:
        _step(f"private state in {state}")
        if has_ecflow:
            ecf = LoopbackEcflowServer(state / "ecflow").start()
            _step(f"ecflow_server on 127.0.0.1:{ecf.port} (pid {ecf.pid})")
        else:
            _step(f"skipping the ecFlow stage: {ecflow_missing()}")
        emu = GuiserverEmulator(state / "difx-sandbox", port=0, outcomes={DIFX_JOB: "slow"},
                                slow_ticks=DIFX_TICKS, step_delay=0.2).start()
        prepare_difx(emu)
        _step(f"guiServer emulator on {emu.address}")
        from flowbus._up import secure_bus

        # the embedded default's bus: ipc sockets in the private state dir, source grants on
        config = secure_bus(_config(state, ecf.port if ecf else None, emu.port, has_soma, has_wms), state)
        broker = BrokerProcess(config.bus, config.bus.journal_dir, log_path=str(state / "broker.log"))
        endpoints = broker.start()
        _step(f"broker at {endpoints['request']} (pid {broker.proc.pid if broker.proc else '?'}); starting Ray ...")
        client = Client(endpoints["request"])
        view = LiveView(client.subscribe(""), as_json, out).start()

        from flowbus.actors import SUPERVISOR_NAME, Supervisor, start_ray

        start_ray(config.ray)
        ray_started = True
        # Ray installs its own SIGTERM handler, which would end the process before cleanup
        signal.signal(signal.SIGTERM, _raise_stopped)
        import ray

        supervisor = Supervisor.options(name=SUPERVISOR_NAME).remote(msgspec.json.encode(config), endpoints["request"])
        placement = ray.get(supervisor.start.remote(), timeout=max(30.0, deadline - time.monotonic()))
        _step(f"sessions up in {time.monotonic() - t_start:.1f} s: {', '.join(sorted(placement))}")

        def call_session(session: str, operation: str, *args: Any, **kwargs: Any) -> Any:
            return _call(supervisor, session, operation, list(args), kwargs)

        orchestrator = _start_orchestrator(config, endpoints["request"])
        ctx = Ctx(client=client, call_session=call_session, view=view, step=_step, deadline=deadline,
                  work=state, sessions=set(placement), ecf=ecf, emu=emu, rules=True)
        code = _pipeline(ctx, by_name, keep_going)
    except FlowbusError as exc:
        failed_setup = str(exc)
        _step(f"error: {exc}")
    except KeyboardInterrupt:
        failed_setup = "interrupted (Ctrl-C)"
        code = 130
    except _Stopped:
        failed_setup = "stopped (SIGTERM)"
        code = 143
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if view is not None:
                view.drain()
                for st in stages:
                    if st.started_ns:
                        view.count(st)
            _cleanup(orchestrator, view, client, supervisor, ray_started, ecf, emu, broker)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, old_term if callable(old_term) or old_term in (signal.SIG_DFL, signal.SIG_IGN)
                          else signal.SIG_DFL)
    if failed_setup and code == 1:
        for st in stages:
            if st.result == "pending":
                st.result, st.detail = "failed", f"not run: {failed_setup}"[:200]
    total = time.monotonic() - t_start
    if as_json:
        out.write(json.dumps({"type": "demo.summary", "ok": code == 0, "exit_code": code, "seconds": round(total, 1),
                              "state_dir": str(state), "stages": [s.row() for s in stages]}) + "\n")
        out.flush()
    else:
        print_summary(stages, out)
        out.write(f"\n{'all stages passed' if code == 0 else 'FAILED' if code == 1 else 'stopped'} "
                  f"in {total:.1f} s\n")
        out.flush()
    if code == 1:
        _step(f"kept {state} for inspection (logs: broker.log, ecflow/, qcg/)")
    else:  # success, or stopped on purpose
        shutil.rmtree(state, ignore_errors=True)
    return code


def _call(supervisor: Any, session: str, operation: str, args: list[Any], kwargs: dict[str, Any],
          timeout: float = 120.0) -> Any:
    import ray

    try:
        return ray.get(supervisor.call.remote(session, operation, args, kwargs, timeout), timeout=timeout + 15)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), FlowbusError) else None
        if cause is not None:
            raise cause from None
        raise FlowbusError(f"{operation} on {session!r} failed: {str(exc).strip().splitlines()[-1]}") from None
    except ray.exceptions.GetTimeoutError:
        raise FlowbusError(f"{operation} on {session!r}: no answer within {timeout + 15:g} s") from None


#: stage groups in pipeline order, and the rule that starts each group after the previous one
_GROUPS: list[tuple[tuple[str, ...], str]] = [
    (("ecflow-suite",), ""),
    (("qcg-ensemble",), "suite-done-starts-ensemble"),
    (("soma-workflow", "wms-workflow"), "ensemble-done-starts-workflows"),
    (("difx-job",), "workflows-done-start-difx"),
]


def _pipeline(ctx: Ctx, by_name: dict[str, StageResult], keep_going: bool) -> int:
    """Start the first stage and watch each stage's terminal event; the Orchestrator's rules start
    the next ones. When the group before did not succeed (so its rule cannot fire: --keep-going),
    or for the first group that runs, the demo starts the stage itself."""
    from ._stages import workflow_stages

    failed = False
    rule_armed = False  # the last group that ran succeeded: its rule starts the next group
    for names, rule in _GROUPS:
        group = [by_name[n] for n in names if by_name[n].result != "skipped"]
        if not group:
            continue  # unavailable here: the rules chain around it
        if failed and not keep_going:
            for st in group:
                st.result, st.detail = "skipped", "an earlier stage failed (--keep-going runs it anyway)"
            continue
        kick = not (ctx.rules and rule_armed and rule)
        for st in group:
            st.started_by = "demo" if kick else f"rule {rule}"
        if names[0] == "ecflow-suite":
            run_stage(ctx, group[0], lambda: ecflow_stage(ctx, group[0]))  # noqa: B023 - run_stage calls it at once
        elif names[0] == "qcg-ensemble":
            run_stage(ctx, group[0], lambda: qcg_stage(ctx, group[0], kick))  # noqa: B023 - called at once
        elif names[0] == "soma-workflow":
            soma, wms = by_name["soma-workflow"], by_name["wms-workflow"]
            workflow_stages(ctx, soma if soma in group else None, wms if wms in group else None, kick)
        else:
            run_stage(ctx, group[0], lambda: difx_stage(ctx, group[0], kick))  # noqa: B023 - called at once
        rule_armed = all(st.result == "ok" for st in group)
        failed = failed or not rule_armed
    return 1 if failed else 0


def _cleanup(orchestrator: Any, view: LiveView | None, client: Any, supervisor: Any, ray_started: bool,
             ecf: LoopbackEcflowServer | None, emu: Any, broker: Any) -> None:
    """Stop everything, innermost first; every step runs even when an earlier one failed."""
    _step("stopping everything it started ...")
    steps: list[tuple[str, Any]] = [
        ("orchestrator", lambda: _stop_actor(orchestrator) if orchestrator is not None else None),
        ("view", lambda: view.stop() if view is not None else None),
        ("subscriber", lambda: view.sub.close() if view is not None else None),
        ("client", lambda: client.close() if client is not None else None),
        ("sessions", lambda: _stop_supervisor(supervisor) if supervisor is not None else None),
        ("ray", lambda: _stop_ray() if ray_started else None),
        ("ecflow_server", lambda: _stop_ecf(ecf) if ecf is not None else None),
        ("guiserver emulator", lambda: emu.stop() if emu is not None else None),
        ("broker", lambda: broker.stop() if broker is not None else None),
    ]
    for what, fn in steps:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - keep stopping the rest
            _step(f"stopping {what} failed: {exc}")
    _step("stopped")


def _start_orchestrator(config: FlowbusConfig, address: str) -> Any:
    """The Orchestrator actor running the demo's rules and policy; a rejected rule is an error."""
    import ray

    from flowbus.actors import Orchestrator
    from flowbus.actors.rules import ORCHESTRATOR_NAME

    orchestrator = Orchestrator.options(name=ORCHESTRATOR_NAME, max_restarts=0).remote(
        msgspec.json.encode(config), address)
    info = ray.get(orchestrator.start.remote(), timeout=120)
    if info.get("rejected"):
        raise FlowbusError("the demo's rules were rejected: " + "; ".join(sorted(map(str, info["rejected"].values()))))
    policies = ", ".join(p.name for p in config.policies) or "(none)"
    _step(f"orchestrator: rules {', '.join(info['rules'])}; policies {policies}")
    return orchestrator


def _stop_actor(handle: Any) -> None:
    import ray

    try:
        ray.get(handle.stop.remote(), timeout=30)
    finally:
        ray.kill(handle, no_restart=True)


def _stop_supervisor(supervisor: Any) -> None:
    import ray

    try:
        ray.get(supervisor.stop.remote(), timeout=90)
    finally:
        ray.kill(supervisor)


def _stop_ray() -> None:
    """Shut Ray down; stop_ray also removes the private temporary directory start_ray made for it
    (logs, sockets), and only that one."""
    from flowbus.actors import stop_ray

    stop_ray()


def _stop_ecf(ecf: LoopbackEcflowServer) -> None:
    left = ecf.stop()
    if left:
        raise FlowbusError(f"ecFlow processes still alive: {left}")
