# PYTHON_ARGCOMPLETE_OK  (argcomplete: this command completes itself)
"""The ``flowbus`` command: up, broker, watch, status, wait, submit, call, logs, emulate, keys, stats."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowbus._runfile import read_runfile, resolve_address
from flowbus.schemas import FlowbusError, WaitTimeout

if TYPE_CHECKING:
    from flowbus.schemas import FlowbusConfig


def _port(text: str) -> int:
    """A TCP port for argparse: 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0..65535)")
    return port


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowbus",
                                description="One typed, replayable event stream over workflow managers.")
    from flowbus import __version__

    p.add_argument("--version", action="version", version=f"flowbus {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def command(name: str, about: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=about, description=about)

    def with_address(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--address", help="broker request endpoint (default: $FLOWBUS_ADDRESS, the running "
                        "`flowbus up`, or ipc://<state-dir>/bus/request)")
        sp.add_argument("--config", help="TOML config whose [bus.curve] keys to use (default: the running "
                        "`flowbus up`'s)")
        sp.add_argument("--timeout-connect", type=float, default=5.0, metavar="S", help=argparse.SUPPRESS)
        return sp

    up = command("up", "run broker, Ray and the configured sessions; show events live")
    up.add_argument("--config", help="TOML config file (default: the embedded default, a local QCG manager)")
    up.add_argument("--fresh", action="store_true", help="start with an empty journal")
    up.add_argument("--demo", action="store_true", help="submit a small QCG job set once everything runs")
    up.add_argument("--duration", type=float, metavar="S", help="stop by itself after S seconds")
    up.add_argument("--json", action="store_true", help="events as JSON lines")
    up.add_argument("--heartbeats", action="store_true", help="show the sessions' heartbeats too (every 10 s each)")
    up.add_argument("--address", metavar="ADDR", help="join this Ray cluster instead of the config's [ray] address: "
                    "host:port (its GCS), auto, or ray://host:10001")
    up.add_argument("--broker", metavar="tcp://HOST:PORT", help="use this running broker (its request endpoint) "
                    "instead of starting one")

    dm = command("demo", "run a cross-backend pipeline once on a private embedded stack, live")
    dm.add_argument("--json", action="store_true", help="events and the final summary as JSON lines")
    dm.add_argument("--keep-going", action="store_true", help="run the later stages even after one failed")
    dm.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up after S seconds (default 300)")

    br = command("broker", "run only the bus broker (foreground)")
    br.add_argument("--config", help="TOML config file (its [bus] table)")
    br.add_argument("--config-json", help=argparse.SUPPRESS)
    br.add_argument("--journal-dir", help="on-disk journal directory (overrides the config)")

    w = with_address(command("watch", "stream live events"))
    w.add_argument("prefix", nargs="*", default=[""], metavar="match",
                   help="topic prefixes (qcg/, qcg/local/state/) or match expressions as wait takes them "
                        "('qcg/*/state/ state=aborted')")
    w.add_argument("--json", action="store_true", help="JSON lines for scripts")
    w.add_argument("--heartbeats", action="store_true", help="show the sessions' heartbeats too")
    w.add_argument("--snapshot", action="store_true", help="first print the current state")
    w.add_argument("--replay", action="store_true", help="first print everything the journal holds")
    w.add_argument("--count", type=int, help="exit after N events")
    w.add_argument("--for", dest="duration", type=float, metavar="S", help="exit after S seconds")

    st = with_address(command("status", "current state of every known resource (stale ones marked)"))
    st.add_argument("prefix", nargs="?", default="", metavar="match",
                    help="a topic prefix (qcg/local/) or a match expression ('qcg/*/state/ final=false')")
    st.add_argument("--state", help="only these states, comma-separated (e.g. aborted,active)")
    st.add_argument("--colour", choices=["auto", "always", "never"], default="auto",
                    help="colour the table (auto: when stdout is a terminal)")
    st.add_argument("--json", action="store_true")

    wt = with_address(command("wait", "block until an event or state matches"))
    wt.add_argument("match", help="e.g. 'qcg/local/state/job1 state=complete|aborted'")
    wt.add_argument("--timeout", type=float, default=30.0, help="seconds; on a timeout the exit status is 124")
    wt.add_argument("--json", action="store_true")

    sm = with_address(command("submit", "submit work to a backend session"))
    sm.add_argument("--timeout", type=float, default=300.0, metavar="S", help=argparse.SUPPRESS)
    sm_sub = sm.add_subparsers(dest="backend", required=True, metavar="BACKEND")
    q = sm_sub.add_parser("qcg", help="submit QCG-PilotJob jobs")
    q.add_argument("--session", default="local")
    q.add_argument("--name", help="job name (default: job-<n>)")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--exec", dest="exec_", metavar="PATH", help="executable")
    g.add_argument("--script", help="shell script text (run by bash -l -c)")
    g.add_argument("--jobs-file", help="JSON list of job dicts (QCG Jobs.add keywords)")
    q.add_argument("--arg", action="append", default=[], dest="args", help="argument (repeatable)")
    q.add_argument("--cores", type=int, default=1)
    q.add_argument("--after", action="append", default=[], help="dependency (repeatable)")
    q.add_argument("--iterations", type=int, help="run N iterations (${it} in args)")
    q.add_argument("--stdout")
    q.add_argument("--stderr")

    c = with_address(command("call", "run any operation of a session, e.g. `flowbus call local list`"))
    c.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up after S seconds (default 300)")
    c.add_argument("--json", action="store_true", help="the result as JSON even when it is a string")
    c.add_argument("session")
    c.add_argument("operation")
    c.add_argument("args", nargs="?", default="[]", help="JSON list of positional arguments")
    c.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")

    rl = with_address(command("rules", "the orchestrator's rules and policies: progress, rejected ones"))
    rl.add_argument("--json", action="store_true")

    em = command("emulate", "run a backend emulator in the foreground (for demos and tests)")
    em_sub = em.add_subparsers(dest="backend", required=True, metavar="BACKEND")
    gs = em_sub.add_parser("guiserver", help="a protocol-faithful DiFX guiServer on 127.0.0.1 that runs nothing")
    gs.add_argument("--port", type=_port, default=50200, help="TCP port (0: any free port; default 50200)")
    gs.add_argument("--sandbox", default=None, help="directory that stands in for the server's file system")
    gs.add_argument("--crash-after-job", action="store_true", help="reproduce the real server's crash after a job")

    k = command("keys", "make a CurveZMQ key pair")
    k.add_argument("--dir", default=".", help="where to write NAME.key and NAME.key_secret")
    k.add_argument("--name", default="flowbus")
    k.add_argument("--force", action="store_true", help="replace NAME.key and NAME.key_secret if they exist")

    s = with_address(command("stats", "broker statistics"))
    s.add_argument("--json", action="store_true")

    from flowbus import _cli_logs

    _cli_logs.add_arguments(with_address(command("logs", _cli_logs.ABOUT)))
    EXAMPLES.setdefault("logs", _cli_logs.EXAMPLES)
    from flowbus.dashboard import CLI_EXAMPLES, add_cli_parser  # `flowbus dashboard` (the web stack is not imported)

    add_cli_parser(sub, _port)
    EXAMPLES.setdefault("dashboard", CLI_EXAMPLES)
    for name, parser in sub.choices.items():  # each subcommand's --help ends with examples
        parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


#: one or more runnable examples per subcommand, shown by ``flowbus <command> --help``
EXAMPLES: dict[str, list[str]] = {
    "up": ["flowbus up                              # the embedded default: a local QCG manager",
           "flowbus up --config flowbus.toml --demo # your sessions, and a small demo job set"],
    "demo": ["flowbus demo                            # ecFlow, QCG, soma, WMS and DiFX stages, live"],
    "broker": ["flowbus broker --config flowbus.toml    # only the bus, in the foreground"],
    "watch": ["flowbus watch qcg/                      # every QCG event, live",
              "flowbus watch 'qcg/*/state/ state=aborted' --snapshot"],
    "status": ["flowbus status                          # every resource: state, age, reason, stale marks",
               "flowbus status 'qcg/*/state/' --state aborted,active --json"],
    "wait": ["flowbus wait 'qcg/local/state/ens state=complete|aborted' --timeout 600   # 124 on timeout"],
    "submit": ["flowbus submit qcg --exec /bin/sleep --arg 5 --name nap",
               "flowbus submit qcg --jobs-file jobs.json"],
    "call": ["flowbus call local list",
             "flowbus call local cancel '[[\"nap\"]]'",
             "flowbus call ops get_defs               # text results are printed as they are"],
    "rules": ["flowbus rules --json"],
    "emulate": ["flowbus emulate guiserver --port 50200"],
    "keys": ["flowbus keys --dir ~/.flowbus --name broker"],
    "stats": ["flowbus stats --json"],
}


#: commands that can run without the logging set-up (it costs ~50 ms of imports): the fast path
_QUIET = ("call", "submit", "logs")


#: `wait` exit status on a timeout, as timeout(1) has it (errors are 1)
EXIT_TIMEOUT = 124


def main(argv: list[str] | None = None) -> int:
    """The ``flowbus`` command. Every failure is one line on stderr (exit 1; usage errors 2, a
    ``wait`` timeout 124, Ctrl-C 130, a reader that went away (``| head``) 141, quietly)."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # a shell asks for completions (argcomplete)
        import argcomplete

        argcomplete.autocomplete(parser)  # answers through fd 8 and exits
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare `flowbus`: what it can do
        parser.print_help()
        return 0
    if args.cmd not in _QUIET:
        from flowbus._logging import configure

        quiet = ("watch", "status", "wait", "stats", "demo", "rules", "dashboard")
        configure("warning" if args.cmd in quiet else "info")
    try:
        return int(_COMMANDS[args.cmd](args) or 0)
    except WaitTimeout as exc:
        print(f"flowbus: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT if args.cmd == "wait" else 1
    except FlowbusError as exc:
        print(f"flowbus: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _client(args: argparse.Namespace) -> Any:
    """A bus client for the CLI: the address given, else the running ``flowbus up``'s, with the
    CurveZMQ keys of ``--config`` or of that ``flowbus up`` (keys it made itself included)."""
    import msgspec

    from flowbus.bus import Client
    from flowbus.schemas import CurveConfig, load_config

    address = getattr(args, "address", None)
    path = getattr(args, "config", None)
    curve: CurveConfig | None = load_config(path).bus.curve if path else None
    if curve is None:
        run = read_runfile()
        if run and (not address or address == run.get("request")):
            if isinstance(run.get("curve"), dict):
                curve = msgspec.convert(run["curve"], CurveConfig)
            elif run.get("config"):
                curve = load_config(run["config"]).bus.curve
    return Client(resolve_address(address), curve=curve, timeout=getattr(args, "timeout_connect", 5.0))


def cmd_broker(args: argparse.Namespace) -> int:
    import msgspec

    from flowbus.bus import serve
    from flowbus.schemas import BusConfig, load_config

    if args.config_json:
        bus = msgspec.json.decode(args.config_json, type=BusConfig)
    else:
        from flowbus._up import secure_bus

        config = load_config(args.config)  # the embedded default without --config
        bus = secure_bus(config, config.state_path()).bus  # ipc in the state dir, a grant key, keys for TCP
    # started by BrokerProcess (--config-json): it ends with its parent, as a child should
    serve(bus, args.journal_dir, die_with_parent=bool(args.config_json))
    return 0


def _watch_filters(exprs: list[str]) -> list[Any]:
    """What ``watch`` keeps: a plain prefix (no wildcard, no condition: ``qcg/``,
    ``qcg/local/state/``) keeps every topic below it, as it always did; anything else is a match
    expression as ``wait`` takes it, where a glob ending in ``/`` covers everything below it
    (``qcg/*/state/``). Each is checked as it is parsed (a typo is refused at once)."""
    from flowbus.bus import Match

    out = []
    for expr in exprs or [""]:
        head, *conds = expr.split() or [""]
        if head.endswith("/") and any(ch in head for ch in "*?["):
            head += "*"
        m = Match(" ".join([head or "*", *conds]))
        if not conds and m.prefix == m.glob:
            m = Match(m.glob + "*") if not any(ch in m.glob for ch in "*?[") else m
        out.append(m)
    return out


def _check_sessions(client: Any, *matches: Any) -> None:
    """Refuse a match naming a session the running ``flowbus up`` does not have (did-you-mean);
    nothing is checked when no ``flowbus up`` answers here."""
    try:
        names = client.command("sessions", timeout=5.0)
    except FlowbusError:
        return
    if not isinstance(names, dict):
        return
    for m in matches:
        m.check_names(sorted(names))


def cmd_watch(args: argparse.Namespace) -> int:
    import time

    from flowbus._render import print_event

    matches = _watch_filters(args.prefix)
    start = "replay" if args.replay else "snapshot" if args.snapshot else "live"
    with _client(args) as client:
        _check_sessions(client, *matches)
        prefixes = sorted({m.prefix for m in matches})
        with client.subscribe(prefixes, start="journal" if start == "replay" else start) as sub:
            n, end = 0, (time.monotonic() + args.duration) if args.duration else None
            while args.count is None or n < args.count:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                ev = sub.recv(left if left is not None else 1.0)
                if ev is not None and any(m(ev) for m in matches) and (args.heartbeats or ev.FAMILY != "heartbeat"):
                    print_event(ev, args.json)
                    n += 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flowbus._render import event_json, print_table
    from flowbus.bus import Match

    (match,) = _watch_filters([args.prefix])
    if args.state:
        match = Match(f"{match.text} state={'|'.join(s.strip() for s in args.state.split(','))}")
    with _client(args) as client:
        _check_sessions(client, match)
        snap = client.snapshot(match.prefix)
    events = [e for e in snap.events if match(e)]
    if args.json:
        print("[" + ",\n".join(event_json(e, snap) for e in events) + "]")
    else:
        print_table(events, snapshot=snap, colour=None if args.colour == "auto" else args.colour == "always")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from flowbus._render import print_event
    from flowbus.bus import Match

    match = Match(args.match)  # a typo is refused before anything connects
    with _client(args) as client:
        _check_sessions(client, match)
        ev = client.wait(match, timeout=args.timeout)
    print_event(ev, args.json)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
        limits = stats.setdefault("limits", {})
        try:  # the sessions' retention, when a `flowbus up` serves this broker
            actors = client.command("actors", timeout=10.0)
            limits["retention"] = {s: r for a in actors.values() for s, r in (a.get("retention") or {}).items()}
        except FlowbusError:
            pass
        try:  # the orchestrator's bounds
            limits["orchestrator"] = client.command("rules", timeout=5.0).get("limits", {})
        except FlowbusError:
            pass
    print(json.dumps(stats, indent=None if args.json else 2, sort_keys=True))
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    import signal
    import tempfile
    import threading

    from flowbus.services.guiserver_emulator import GuiserverEmulator

    sandbox = args.sandbox or tempfile.mkdtemp(prefix="flowbus-guiserver-")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with GuiserverEmulator(sandbox, port=args.port, crash_after_job=args.crash_after_job) as emu:
        print(f"guiServer emulator on {emu.address} (sandbox {sandbox}); Ctrl-C stops it", flush=True)
        try:
            # a signal may land on another thread; waking up now and then lets the main thread
            # run the handler (an untimed wait would never return)
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from flowbus.bus import make_keypair

    public, secret = make_keypair(args.dir, args.name, force=args.force)
    print(f"public key: {public}\nsecret key: {secret}  (keep it private)")
    return 0


def _session_call(args: argparse.Namespace, session: str, operation: str, call_args: list[Any],
                  kwargs: dict[str, Any]) -> Any:
    """One operation through the bus's command socket to the Supervisor of the running
    ``flowbus up`` (a moved session is still reached; no Ray driver is started)."""
    run = None if (args.address or args.config) else read_runfile()
    if run and run.get("command"):
        # the fast path: the command endpoint and keys from the run file, no broker round trip
        # first and nothing of the bus beyond the command client (see bench/call.py)
        import zmq

        from flowbus.bus import Commander

        curve = None
        if isinstance(run.get("curve"), dict) and (run["curve"].get("server_secret_key_file")
                                                   or run["curve"].get("server_public_key_file")):
            import msgspec

            from flowbus.bus import ClientCurve
            from flowbus.schemas import CurveConfig

            curve = ClientCurve.from_config(msgspec.convert(run["curve"], CurveConfig))
        endpoint, request = str(run["command"]), str(run.get("request", ""))
        if endpoint.startswith("tcp://") and request.startswith("tcp://"):  # the host the broker was reached by
            endpoint = f"{request.rsplit(':', 1)[0]}:{endpoint.rsplit(':', 1)[1]}"
        commander = Commander(zmq.Context.instance(), endpoint, curve)
        try:
            return commander.call("call", args.timeout, session=session, operation=operation, args=call_args,
                                  kwargs=kwargs)
        finally:
            commander.close()
    from flowbus._logging import configure

    configure("warning")
    with _client(args) as client:
        return client.call(session, operation, call_args, kwargs, timeout=args.timeout)


def cmd_submit(args: argparse.Namespace) -> int:
    if args.jobs_file:
        try:
            jobs = json.loads(Path(args.jobs_file).read_text())
        except (OSError, ValueError) as exc:
            raise FlowbusError(f"--jobs-file {args.jobs_file}: {exc}") from None
        if not isinstance(jobs, list):
            raise FlowbusError(f"--jobs-file {args.jobs_file}: expected a JSON list of job objects")
    else:
        import uuid

        job: dict[str, Any] = {"name": args.name or f"job-{uuid.uuid4().hex[:6]}", "numCores": args.cores}
        if args.exec_:
            job.update(exec=args.exec_, args=args.args)
        else:
            job["script"] = args.script
        for key in ("after", "stdout", "stderr"):
            if getattr(args, key):
                job[key] = getattr(args, key)
        if args.iterations:
            job["iteration"] = args.iterations
        jobs = [job]
    names = _session_call(args, args.session, "submit", [jobs], {})
    print("\n".join(names))
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    try:
        call_args, kwargs = json.loads(args.args), json.loads(args.kwargs)
    except ValueError as exc:
        raise FlowbusError(f"arguments must be JSON: {exc}") from None
    if not isinstance(call_args, list) or not isinstance(kwargs, dict):
        raise FlowbusError("args must be a JSON list and --kwargs a JSON object")
    result = _session_call(args, args.session, args.operation, call_args, kwargs)
    if isinstance(result, str) and not args.json:
        print(result)  # text as it is (a suite definition, a log), not a JSON string with \n escapes
    else:
        print(json.dumps(result, indent=2, default=str))
    errors = result.get("errors") if isinstance(result, dict) else None
    if errors:  # the call ran, but the backend refused some of its items (e.g. QCG's cancel of a finished job)
        items = errors.items() if isinstance(errors, dict) else ((str(e), "") for e in errors)
        what = "; ".join(f"{k}: {v}" if v else k for k, v in items)
        sys.stderr.write(f"flowbus: error: {args.operation} on {args.session!r} failed for some items: {what}\n")
        return 1
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    with _client(args) as client:
        st = client.command("rules", timeout=60.0)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    for name, r in sorted(st.get("rules", {}).items()):
        print(f"rule    {name:32} fired {r['fired']:<5} {r['progress']}")
    for name, p in sorted(st.get("policies", {}).items()):
        print(f"policy  {name:32} " + " ".join(f"{k}={v}" for k, v in p.items()))
    for why in sorted(st.get("rejected", {}).values()):
        print(f"REJECTED {why}")
    return 0


def _dashboard_run(args: argparse.Namespace) -> int:
    from flowbus.dashboard import run_cli

    return run_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from flowbus.demo import run_demo

    return run_demo(as_json=args.json, keep_going=args.keep_going, timeout=args.timeout)


def cmd_up(args: argparse.Namespace) -> int:
    from flowbus._up import run_up
    from flowbus.schemas import load_config

    config: FlowbusConfig = load_config(args.config)
    from flowbus._logging import configure

    configure(config.log.level, config.log.json, config.log.file, config.log.max_bytes, config.log.backups)
    return run_up(config, fresh=args.fresh, demo=args.demo, duration=args.duration, as_json=args.json,
                  config_path=str(Path(args.config).resolve()) if args.config else None,
                  ray_address=args.address, broker_address=args.broker, heartbeats=args.heartbeats)


def _cmd_logs(args: argparse.Namespace) -> int:
    from flowbus._cli_logs import cmd_logs

    return cmd_logs(args)


_COMMANDS = {
    "up": cmd_up, "broker": cmd_broker, "watch": cmd_watch, "status": cmd_status, "wait": cmd_wait,
    "submit": cmd_submit, "call": cmd_call, "keys": cmd_keys, "stats": cmd_stats, "emulate": cmd_emulate,
    "demo": cmd_demo, "rules": cmd_rules, "logs": _cmd_logs, "dashboard": _dashboard_run,
}
