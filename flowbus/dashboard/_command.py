"""``flowbus dashboard``: the URL of the running ``flowbus up``'s dashboard, or (``--serve``) a
dashboard of its own for a running bus, in the foreground.

Registered by ``flowbus/_cli.py`` through :func:`add_cli_parser`; nothing of the web stack is
imported until the command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flowbus._runfile import read_runfile, resolve_address
from flowbus.schemas import FlowbusError

ABOUT = "the live web dashboard: print its URL (with the token), or --serve one for a running bus"
CLI_EXAMPLES = ["flowbus dashboard                       # the URL of the running `flowbus up`'s dashboard",
            "flowbus dashboard --serve --port 0      # a dashboard of its own, on a free port"]


def add_cli_parser(sub: Any, port_type: Any) -> argparse.ArgumentParser:
    """Add ``dashboard`` to the subcommands ``sub`` (argparse's subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser("dashboard", help=ABOUT, description=ABOUT)
    p.add_argument("--serve", action="store_true", help="serve a dashboard here until Ctrl-C (or --duration)")
    p.add_argument("--port", type=port_type, help="with --serve: the port (default: [dashboard] port; 0: any)")
    p.add_argument("--duration", type=float, metavar="S", help="with --serve: stop after S seconds")
    p.add_argument("--address", help="with --serve: the broker request endpoint (default: `flowbus up`'s)")
    p.add_argument("--config", help="with --serve: TOML config (its [bus.curve] keys, its [dashboard] table)")
    return p


def run_cli(args: argparse.Namespace) -> int:
    if not args.serve:
        for name in ("port", "duration", "address", "config"):
            if getattr(args, name) is not None:
                raise FlowbusError(f"--{name} goes with --serve (without it the running `flowbus up`'s URL is printed)")
        return _print_url()
    return _serve(args)


def _print_url() -> int:
    from flowbus._runfile import state_dir

    run_info = read_runfile()
    if not run_info:
        raise FlowbusError("no `flowbus up` is running here (start it, or `flowbus dashboard --serve` "
                           "for a bus started elsewhere)")
    url = run_info.get("dashboard")
    if not url:
        raise FlowbusError("the running `flowbus up` serves no dashboard ([dashboard] port = -1); "
                           "`flowbus dashboard --serve` starts one")
    from ._server import dashboard_token

    print(f"{url}?token={dashboard_token(state_dir())}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import msgspec

    from flowbus.schemas import CurveConfig, load_config, private_state_dir

    from ._server import DashboardServer

    run_info = read_runfile()
    config_path = args.config or (run_info.get("config") if run_info and not args.address else None)
    config = load_config(config_path) if config_path else None
    curve: Any = config.bus.curve if args.config and config else None
    if curve is None and run_info and (not args.address or args.address == run_info.get("request")) \
            and isinstance(run_info.get("curve"), dict):
        curve = msgspec.convert(run_info["curve"], CurveConfig)
    dash = config.dashboard if config else load_config(None).dashboard
    if args.port is not None:
        dash = msgspec.structs.replace(dash, port=args.port)
    if dash.port < 0:
        raise FlowbusError("the dashboard is off ([dashboard] port = -1); give --port")
    state = config.state_path() if config else private_state_dir()
    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        with DashboardServer(resolve_address(args.address), state=Path(state), config=dash, curve=curve) as server:
            print(f"dashboard at {server.login_url} (token in {server.token_file}); Ctrl-C stops it", flush=True)
            try:
                # woken now and then so that a signal landing on another thread is handled here
                end = None if args.duration is None else time.monotonic() + args.duration
                while not done.wait(0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))):
                    if end is not None and time.monotonic() >= end:
                        break
            except KeyboardInterrupt:
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.flush()
    return 0


__all__ = ["CLI_EXAMPLES", "add_cli_parser", "run_cli"]
