"""Where the broker's four sockets listen: TCP addresses, or ipc paths in a private directory.

``request`` and ``publish`` only read; ``ingest`` and ``command`` write, and on ipc they sit in
``<ipc-dir>/owner/`` (always 0700), so a Unix group given read access (``ipc-group``) can
subscribe and replay but never publish or command.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

from flowbus.schemas import BusConfig, ConfigError

#: the broker's sockets, in bind order
NAMES = ("request", "publish", "ingest", "command")
READ_ONLY = ("request", "publish")
_IPC_PATH_MAX = 100  # a Unix socket path has ~107 bytes; keep room


def check_endpoint(address: str, what: str = "address") -> str:
    """``address`` when it is an endpoint flowbus can connect to (``tcp://HOST:PORT`` with a port
    in 1..65535, or ``ipc://PATH``); else ``ConfigError`` naming it and the right form."""
    text = str(address).strip()
    if text.startswith("ipc://") and len(text) > len("ipc://"):
        return text
    if text.startswith("tcp://"):
        host, _, port = text[len("tcp://"):].rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return text
        raise ConfigError(f"{what} {address!r}: expected tcp://HOST:PORT with a port in 1..65535")
    hint = f" (did you mean 'tcp://{text}'?)" if ":" in text and "://" not in text else ""
    raise ConfigError(f"{what} {address!r}: expected tcp://HOST:PORT or ipc://PATH{hint}")


def tcp_targets(cfg: BusConfig) -> dict[str, str]:
    """``{socket name: tcp://host:port}`` (port 0: any free port)."""
    ports = {"request": cfg.request_port, "publish": cfg.publish_port, "ingest": cfg.ingest_port,
             "command": cfg.command_port}
    return {name: f"tcp://{cfg.host}:{ports[name] or '*'}" for name in NAMES}


def ipc_targets(cfg: BusConfig) -> dict[str, str]:
    """``<ipc-dir>/{request,publish}`` and ``<ipc-dir>/owner/{ingest,command}``; the directories
    are created private (0700; 0750 with ``ipc-group``) and tightened when they exist. Raises
    ConfigError naming the key for a missing or too long ipc-dir and an unknown group."""
    if not cfg.ipc_dir:
        raise ConfigError("bus.ipc-dir: required with bus.transport = \"ipc\" (`flowbus up` uses <state-dir>/bus)")
    base = Path(cfg.ipc_dir).expanduser().absolute()
    owner = base / "owner"
    if len(str(owner / "ingest")) > _IPC_PATH_MAX:
        raise ConfigError(f"bus.ipc-dir: {str(base)!r} is too long for Unix socket paths "
                          f"(at most ~{_IPC_PATH_MAX - 13} characters); choose a shorter state-dir or ipc-dir")
    owner.mkdir(mode=0o700, parents=True, exist_ok=True)
    if cfg.ipc_group:
        try:
            gid = grp.getgrnam(cfg.ipc_group).gr_gid
        except KeyError:
            raise ConfigError(f"bus.ipc-group: no Unix group named {cfg.ipc_group!r}") from None
        os.chown(base, -1, gid)
        base.chmod(0o750)
    else:
        base.chmod(0o700)
    owner.chmod(0o700)
    return {name: f"ipc://{(base if name in READ_ONLY else owner) / name}" for name in NAMES}


def chmod_ipc(cfg: BusConfig, endpoints: dict[str, str]) -> None:
    """Socket files once bound: the group (when configured) may connect to the read sockets only."""
    for name in NAMES:
        mode = 0o660 if cfg.ipc_group and name in READ_ONLY else 0o600
        os.chmod(endpoints[name].removeprefix("ipc://"), mode)
