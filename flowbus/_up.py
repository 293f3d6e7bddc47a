"""``flowbus up``: broker, Ray, Supervisor and sessions on one machine, with a live event view.

Everything is ended on exit (Ctrl-C, SIGTERM, ``--duration``): sessions stop their backends,
Ray shuts down, the broker is terminated, the run file is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from flowbus._metrics import BusMetrics
from flowbus._render import print_event
from flowbus._runfile import read_runfile, runfile_path, write_private
from flowbus.schemas import FlowbusConfig, FlowbusError, Heartbeat

log = structlog.get_logger("flowbus.up")

DEMO_JOBS: list[dict[str, Any]] = [
    {"name": "demo-prepare", "exec": "/bin/sleep", "args": ["1"]},
    {"name": "demo-ensemble", "exec": "/bin/echo", "args": ["member ${it}"], "iteration": 3, "after": ["demo-prepare"]},
    {"name": "demo-broken", "exec": "/bin/false"},
    {"name": "demo-cleanup", "exec": "/bin/true", "after": ["demo-ensemble"]},
]


def _step(msg: str) -> None:
    print(f"flowbus up: {msg}", file=sys.stderr, flush=True)


def _external_broker(address: str, config: FlowbusConfig) -> dict[str, Any]:
    """The endpoints of a broker we did not start (``--broker``), or a FlowbusError saying why not."""
    import zmq

    from flowbus.bus import ClientCurve, broker_info, same_host

    tcp_ok = address.startswith("tcp://") and address.rpartition(":")[2].isdigit()
    if not (tcp_ok or (address.startswith("ipc://") and len(address) > 6)):
        raise FlowbusError(f"--broker {address!r}: expected the broker's request endpoint, tcp://HOST:PORT or ipc:///PATH")
    try:
        info = broker_info(zmq.Context.instance(), address, ClientCurve.from_config(config.bus.curve), 5.0)
    except FlowbusError as exc:
        raise FlowbusError(f"--broker {address}: no flowbus broker answers there ({exc})") from exc
    return {"request": address,
            **{k: same_host(str(info[k]), address) for k in ("publish", "ingest", "command") if k in info}}


def secure_bus(config: FlowbusConfig, state: Path, *, own_broker: bool = True) -> FlowbusConfig:
    """The bus settings ``flowbus up`` runs with: ipc sockets in ``<state>/bus`` unless configured,
    a source-grant key in ``<state>/keys`` (0600) unless configured, and for ``transport = "tcp"``
    without keys, CurveZMQ keys made in ``<state>/keys`` with the owner as the only admitted
    client. Nothing is overwritten: keys made once are used again. With someone else's broker
    (``own_broker=False``, ``--broker``) nothing is made: its grant key is the configured one, or
    the one the broker names (when this user can read it)."""
    from flowbus.bus import ensure_grant_key, make_keypair

    bus = config.bus
    keys = state / "keys"
    changes: dict[str, Any] = {}
    if bus.transport == "ipc" and not bus.ipc_dir:
        changes["ipc_dir"] = str(state / "bus")
    if not own_broker:
        return config
    if not bus.grant_key_file:
        changes["grant_key_file"] = str(ensure_grant_key(keys / "grant.key"))
    if bus.transport == "tcp" and not bus.curve.server_secret_key_file and not bus.insecure_loopback:
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (keys / "broker.key_secret").exists():
            make_keypair(keys, "broker")
        if not (keys / "owner.key_secret").exists():
            make_keypair(keys, "owner")
        authorized = keys / "authorized"
        authorized.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(keys / "owner.key", authorized / "owner.key")
        changes["curve"] = msgspec.structs.replace(
            bus.curve, server_secret_key_file=str(keys / "broker.key_secret"),
            server_public_key_file=str(keys / "broker.key"), client_secret_key_file=str(keys / "owner.key_secret"),
            authorized_keys_dir=bus.curve.authorized_keys_dir or str(authorized))
    if not changes:
        return config
    return msgspec.structs.replace(config, bus=msgspec.structs.replace(bus, **changes))


def _readable_key(path: str) -> bytes | None:
    """The grant key at ``path`` when there is one this user can read (else commands and
    sessions go without: a broker that checks grants then refuses them, saying so)."""
    from flowbus.bus import load_grant_key

    if not path:
        return None
    try:
        return load_grant_key(path)
    except FlowbusError as exc:
        log.warning("up.grant_key.unreadable", path=path, error=str(exc))
        return None


def _command_handler(supervisor: Any, orchestrator: Any) -> Any:
    """What the command server runs for ``flowbus call``/``Client.call``: the Supervisor's call
    (so a session that moved is reached), the session list, the rules' progress."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    from flowbus.schemas import BackendTimeout

    def handle(req: dict[str, Any], extend: Callable[[float], None]) -> Any:
        op = req.get("op")
        timeout = float(req.get("timeout") or 300.0)
        try:
            if op == "call":
                session, operation = str(req.get("session")), str(req.get("operation"))
                args, kwargs = req.get("args") or [], req.get("kwargs") or {}
                if not isinstance(args, list) or not isinstance(kwargs, dict):
                    raise FlowbusError("call: args must be a list and kwargs a map")
                # never below the operation's own bound (e.g. wait4(..., timeout=600) under --timeout 300)
                limit = float(ray.get(supervisor.limit.remote(session, operation, args, kwargs, timeout), timeout=60))
                if limit > timeout:
                    timeout = limit
                    extend(timeout)
                ref = supervisor.call.remote(session, operation, args, kwargs, timeout)
                try:
                    return ray.get(ref, timeout=timeout + 5)
                except GetTimeoutError:
                    raise BackendTimeout(f"{operation} on {session!r}: no answer within {timeout:g} s "
                                         "(raise it with --timeout)") from None
            if op == "sessions":
                return ray.get(supervisor.sessions.remote(), timeout=30)
            if op == "actors":
                return ray.get(supervisor.status.remote(), timeout=30)
            if op == "rules":
                if orchestrator is None:
                    raise FlowbusError("no orchestrator is running (the config has no [[rules]] or [[policies]])")
                return ray.get(orchestrator.status.remote(), timeout=60)
            raise FlowbusError(f"unknown command {op!r} (call, sessions, actors, rules)")
        except ray.exceptions.RayTaskError as exc:
            cause = _ray_error(exc)
            if isinstance(cause, FlowbusError):
                raise cause from None
            raise FlowbusError(f"{req.get('operation') or op} on {req.get('session')!r} failed: "
                               f"{str(exc).strip().splitlines()[-1]}") from None
        except RayActorError as exc:
            raise FlowbusError(f"{op}: the actor died ({str(exc).strip().splitlines()[0][:200]})") from None

    return handle


def _ray_error(exc: BaseException) -> BaseException:
    """Our own error inside a RayTaskError (raised in the Supervisor), else ``exc``."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, FlowbusError) else exc


def run_up(config: FlowbusConfig, *, fresh: bool = False, demo: bool = False, duration: float | None = None,
           as_json: bool = False, config_path: str | None = None, ray_address: str | None = None,
           broker_address: str | None = None, heartbeats: bool = False) -> int:
    """Run everything; ``ray_address`` joins an existing Ray cluster (overrides ``[ray] address``),
    ``broker_address`` uses a running broker (its request endpoint) instead of starting one;
    the sessions' heartbeats are shown only with ``heartbeats``."""
    from flowbus.bus import BrokerProcess, Client

    if ray_address:
        config = msgspec.structs.replace(config, ray=msgspec.structs.replace(config.ray, address=ray_address))
    state = config.state_path()
    config = secure_bus(config, state, own_broker=not broker_address)
    runfile = runfile_path(state)
    running = read_runfile(state)
    if running:
        raise FlowbusError(f"flowbus up is already running here (pid {running.get('pid')}, address "
                           f"{running.get('request')}); stop it first, or use another state-dir")
    journal_dir = config.bus.journal_dir or str(state / "journal")
    if fresh:
        shutil.rmtree(journal_dir, ignore_errors=True)
    stopping = {"flag": False}

    def on_signal(*_: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    broker = None if broker_address else BrokerProcess(config.bus, journal_dir, log_path=str(state / "broker.log"))
    supervisor: Any = None
    orchestrator: Any = None
    commands: Any = None
    metrics = BusMetrics()
    metrics_server: Any = None
    dashboard: Any = None
    ray_started = False
    try:
        t0 = time.monotonic()
        if broker is None:
            assert broker_address is not None
            endpoints = _external_broker(broker_address, config)
        else:
            where_bus = config.bus.ipc_dir if config.bus.transport == "ipc" else f"{config.bus.host} (CurveZMQ)"
            _step(f"starting the broker on {where_bus} (journal {journal_dir}) ...")
            endpoints = broker.start()
        where = "loopback only" if config.ray.address == "local" else f"joining {config.ray.address}"
        _step(f"broker ready at {endpoints['request']} ({time.monotonic() - t0:.1f} s); starting Ray ({where}) ...")
        from flowbus.actors import SUPERVISOR_NAME, Supervisor, check_fit, make_plan, start_ray, supervisor_options

        ray_address = start_ray(config.ray, state)
        ray_started = True
        # Ray's own failure-signal handler aborts the process on SIGTERM, before anything we
        # started is stopped; ours (installed after it) stops everything first
        signal.signal(signal.SIGTERM, on_signal)
        _step(f"Ray ready at {ray_address} ({time.monotonic() - t0:.1f} s); "
              f"starting {len(config.sessions)} session(s) ...")
        client = Client(endpoints["request"], curve=config.bus.curve)
        view = client.subscribe("", start="snapshot")
        import ray

        check_fit(make_plan(config), ray.nodes())  # a clear error now, not actors pending forever
        # rules see what the sessions publish from their first event on, though the orchestrator
        # starts after them: on its first start it catches up from these marks
        since = {src: int(m[2]) for src, m in client.marks().items()}
        supervisor = Supervisor.options(**supervisor_options(SUPERVISOR_NAME)).remote(
            msgspec.json.encode(config), endpoints["request"])
        try:
            placement: dict[str, str] = ray.get(supervisor.start.remote(), timeout=config.ray.start_timeout + 60)
        except ray.exceptions.RayTaskError as exc:
            raise _ray_error(exc) from None
        if config.rules or config.policies:
            orchestrator = _start_orchestrator(config, endpoints["request"], since)
        from flowbus.actors import ACTOR_PREFIX
        from flowbus.bus import ClientCurve, CommandServer, same_host

        key_file = config.bus.grant_key_file or str(client.info.get("grant_key_file") or "")
        commands = CommandServer(same_host(str(client.info["command"]), endpoints["request"]),
                                 _command_handler(supervisor, orchestrator),
                                 curve=ClientCurve.from_config(config.bus.curve), grant_key=_readable_key(key_file))
        if config.metrics.port >= 0:
            from flowbus._metrics import MetricsServer

            metrics_server = MetricsServer(metrics, client.stats, state, config.metrics.host,
                                           config.metrics.port).start()
            _step(f"metrics at {metrics_server.url} (bearer token in {metrics_server.token_file})")
        if config.dashboard.port >= 0:
            from flowbus.dashboard import DashboardServer

            dashboard = DashboardServer(endpoints["request"], state=state, config=config.dashboard,
                                        curve=config.bus.curve).start()
            _step(f"dashboard at {dashboard.login_url} (later: `flowbus dashboard` prints it)")
        write_private(runfile, json.dumps({
            "metrics": metrics_server.url if metrics_server else None,
            "dashboard": dashboard.url if dashboard else None,
            **endpoints, "command": client.info.get("command"), "ray_address": ray_address,
            "namespace": config.ray.namespace, "placement": {s: ACTOR_PREFIX + a for s, a in placement.items()},
            "broker_pid": broker.proc.pid if broker and broker.proc else None, "config": config_path,
            "curve": msgspec.to_builtins(config.bus.curve), "pid": os.getpid()}, indent=2))
        _step(f"ready in {time.monotonic() - t0:.1f} s: sessions {', '.join(sorted(placement)) or '(none)'}; "
              f"address {endpoints['request']}. Try `flowbus watch`, `flowbus status`, "
              f"`flowbus submit qcg --exec /bin/date`. Ctrl-C stops everything.")
        if demo:
            _run_demo(supervisor, placement)
        end = time.monotonic() + duration if duration else None
        while not stopping["flag"] and (end is None or time.monotonic() < end):
            if broker is not None and not broker.alive():
                # same ports, journal from disk: publishers re-register and resend, subscribers
                # reconnect and replay what they missed
                code = broker.proc.poll() if broker.proc else "?"
                _step(f"the broker died (exit code {code}); starting it again ...")
                broker.start()
                run = json.loads(runfile.read_text())
                run["broker_pid"] = broker.proc.pid if broker.proc else None
                write_private(runfile, json.dumps(run, indent=2))
                _step("broker back")
            ev = view.recv(0.5)
            if ev is not None:
                metrics.apply(ev)
            if ev is not None and (heartbeats or not isinstance(ev, Heartbeat)):
                print_event(ev, as_json)
        view.close()
        client.close()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _step("stopping ...")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        try:
            if metrics_server is not None:
                metrics_server.stop()
            if dashboard is not None:
                dashboard.stop()
            if commands is not None:
                commands.close()
            if orchestrator is not None:
                _stop_orchestrator(orchestrator)
            if supervisor is not None:
                import ray

                try:
                    ray.get(supervisor.stop.remote(), timeout=90)
                except Exception as exc:  # noqa: BLE001 - keep shutting down
                    log.error("up.stop.sessions_failed", error=str(exc)[:300])
                ray.kill(supervisor)
        finally:
            if ray_started:
                from flowbus.actors import stop_ray

                stop_ray()
            if broker is not None:
                broker.stop()
            runfile.unlink(missing_ok=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _step("stopped")


def _run_demo(supervisor: Any, placement: dict[str, str]) -> None:
    import ray

    qcg = next((s for s in placement if s == "local"), None) or next(iter(placement), None)
    if qcg is None:
        raise FlowbusError("--demo needs at least one QCG session")
    names = ray.get(supervisor.call.remote(qcg, "submit", [DEMO_JOBS], {}), timeout=60)
    _step(f"demo: submitted {', '.join(names)} to session {qcg!r}")


def _start_orchestrator(config: FlowbusConfig, address: str, since: dict[str, int] | None = None) -> Any:
    """The Orchestrator actor for the config's rules and policies; rejected rules are named."""
    import ray

    from flowbus.actors import Orchestrator
    from flowbus.actors.rules import ORCHESTRATOR_NAME

    orchestrator = Orchestrator.options(name=ORCHESTRATOR_NAME).remote(msgspec.json.encode(config), address,
                                                                       since=since)
    info = ray.get(orchestrator.start.remote(), timeout=120)
    _step(f"orchestrator: {len(info['rules'])} rule(s) running, {len(config.policies)} policy(ies)")
    for why in sorted(info["rejected"].values()):
        _step(f"rejected {why}")
    return orchestrator


def _stop_orchestrator(orchestrator: Any) -> None:
    import ray

    try:
        ray.get(orchestrator.stop.remote(), timeout=30)
    except Exception as exc:  # noqa: BLE001 - keep shutting down
        log.error("up.stop.orchestrator_failed", error=str(exc)[:300])
    ray.kill(orchestrator, no_restart=True)
