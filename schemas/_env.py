"""guiServer connection defaults from the environment, as the DiFX Python interface takes them.

docs/protocols/guiserver.md §6.3: host from ``DIFX_CONTROL_HOST`` (else ``localhost``); port from
``DIFX_CONTROL_PORT``, else ``DIFX_MESSAGE_PORT``, else 50401. ``DIFX_MESSAGE_PORT`` is, for the
server itself (docs/protocols/guiserver.md §1), the variable that sets both its TCP port and the
UDP multicast port, so it names the guiServer port too. Our config keeps its own default (50200,
the server's default) when neither is set.

Pure: the environment is a parameter (adapters never read ``os.environ``); the caller merges the
result under the explicit keys of a ``[[sessions]]`` table (explicit keys win).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ._errors import ConfigError

#: the variables read, in precedence order per config key
HOST_VARS = ("DIFX_CONTROL_HOST",)
PORT_VARS = ("DIFX_CONTROL_PORT", "DIFX_MESSAGE_PORT")
_INT = re.compile(r"[+-]?[0-9]+")


def guiserver_env_defaults(env: Mapping[str, str]) -> dict[str, object]:
    """The guiServer session keys (kebab-case, as in the config file) that ``env`` supplies.

    ``{"host": str}`` from ``DIFX_CONTROL_HOST``; ``{"port": int}`` from ``DIFX_CONTROL_PORT``, or
    when that is unset ``DIFX_MESSAGE_PORT``. A variable that is unset or empty (after stripping
    blanks) supplies nothing; only the variable actually used is validated. Raises
    ``ConfigError`` naming the variable for a host with blanks or control characters, a port that
    is not a decimal integer, or a port outside 1..65535.
    """
    out: dict[str, object] = {}
    for var in HOST_VARS:
        raw = env.get(var, "").strip()
        if not raw:
            continue
        if any(ch.isspace() or not ch.isprintable() for ch in raw):
            raise ConfigError(f"environment {var}={raw!r}: not a host name or address")
        out["host"] = raw
        break
    for var in PORT_VARS:
        raw = env.get(var, "").strip()
        if not raw:
            continue
        if not _INT.fullmatch(raw):
            raise ConfigError(f"environment {var}={raw!r}: port must be an integer")
        port = int(raw)
        if not 1 <= port <= 65535:
            raise ConfigError(f"environment {var}={raw!r}: port {port} out of range (1..65535)")
        out["port"] = port
        break
    return out


__all__ = ["HOST_VARS", "PORT_VARS", "guiserver_env_defaults"]
