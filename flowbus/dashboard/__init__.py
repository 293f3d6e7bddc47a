"""The live web dashboard of ``flowbus up`` (docs/dashboard.md): a tree of backends, sessions and
resources with their states, a timeline, the rules' firings and recoveries, job logs on click.

The names below are loaded from their modules on first use: the CLI registers its subcommand
without importing the web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowbus.schemas import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from ._app import CSP, Guard, Hub, TooManyClients, cookie_name, logs_problem, make_app, parse_match
    from ._command import CLI_EXAMPLES, add_cli_parser, run_cli
    from ._model import STATE_COLOURS, DashboardModel, row_id, visible_ops
    from ._server import DEFAULT_PORT, TOKEN_FILE, DashboardServer, bind, dashboard_token

_WHERE = {
    "CLI_EXAMPLES": "_command", "add_cli_parser": "_command", "run_cli": "_command",
    "CSP": "_app", "Guard": "_app", "Hub": "_app", "TooManyClients": "_app", "cookie_name": "_app",
    "logs_problem": "_app", "make_app": "_app", "parse_match": "_app",
    "STATE_COLOURS": "_model", "DashboardModel": "_model", "row_id": "_model", "visible_ops": "_model",
    "DEFAULT_PORT": "_server", "TOKEN_FILE": "_server", "DashboardServer": "_server", "bind": "_server",
    "dashboard_token": "_server",
}

__getattr__ = _lazy_exports(__name__, globals(), _WHERE)

__all__ = [
    "CLI_EXAMPLES",
    "CSP",
    "DEFAULT_PORT",
    "STATE_COLOURS",
    "TOKEN_FILE",
    "DashboardModel",
    "DashboardServer",
    "Guard",
    "Hub",
    "TooManyClients",
    "add_cli_parser",
    "bind",
    "cookie_name",
    "dashboard_token",
    "logs_problem",
    "make_app",
    "parse_match",
    "row_id",
    "run_cli",
    "visible_ops",
]
