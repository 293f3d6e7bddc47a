"""Source grants: how the broker tells a flowbus session's source from one any process named.

A grant is ``[owner, mac]``: ``owner`` names the session (``qcg/local``), ``mac`` is an HMAC-SHA256
over the source, its backend and the owner, keyed with a secret only ``flowbus up`` (or the helm
chart's Secret) holds. The Supervisor computes grants and hands them to the BackendActors that
open the sessions; the broker checks them at registration. A source registered once with a grant
belongs to its owner from then on (the owner is journaled): registrations without a valid grant
for it are refused, naming the owner. Grants only travel over authenticated channels (Ray with
its token, the bus behind ipc/CurveZMQ), and the key file is 0600 in the 0700 state directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

import structlog

from flowbus.schemas import ConfigError

log = structlog.get_logger("flowbus.grant")

#: a grant as it travels: ``[owner, mac]``
Grant = list[object]

_CONTEXT = b"flowbus-source-grant-v1\x00"
KEY_BYTES = 32


def _mac(key: bytes, source: str, backend: str, owner: str) -> bytes:
    msg = _CONTEXT + b"\x00".join(s.encode("utf-8", "surrogatepass") for s in (source, backend, owner))
    return hmac.new(key, msg, hashlib.sha256).digest()


def make_grant(key: bytes, source: str, backend: str, owner: str | None = None) -> Grant:
    """The grant for ``source``; ``owner`` defaults to ``<backend>/<source>`` (a session's name)."""
    owner = owner or f"{backend}/{source}"
    return [owner, _mac(key, source, backend, owner)]


def check_grant(key: bytes, source: str, backend: str, grant: object) -> str:
    """The grant's owner when it is valid for this source and backend; ValueError otherwise."""
    if not (isinstance(grant, (list, tuple)) and len(grant) == 2 and isinstance(grant[0], str)
            and isinstance(grant[1], bytes) and 0 < len(grant[0]) <= 256):
        raise ValueError("malformed grant (expected [owner, mac])")
    owner, mac = grant[0], grant[1]
    if not hmac.compare_digest(mac, _mac(key, source, backend, owner)):
        raise ValueError(f"grant for source {source!r} ({backend}) is not valid for this broker's key")
    return owner


def grant_key_file(configured: str, broker_address: str, curve: Any = None) -> str:
    """The grant key file flowbus's own actors sign with: the configured one, else the one the
    broker names in its ``info`` (same machine, same user: readable) ; "" when there is none or
    it cannot be read here (the broker then refuses grants, saying so)."""
    if configured:
        return configured
    import zmq

    from ._request import Requester

    req = Requester(zmq.Context.instance(), broker_address, curve, timeout=10.0)
    try:
        path = str(req.call("info").get("grant_key_file") or "")
    finally:
        req.close()
    if path and not os.access(path, os.R_OK):
        log.warning("grant.key.unreadable", path=path)
        return ""
    return path


def load_grant_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key file written by :func:`ensure_grant_key`; ConfigError naming the file if not."""
    p = Path(path).expanduser()
    try:
        text = p.read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"bus.grant-key-file: cannot read {str(p)!r}: {exc}") from None
    if len(key) < 16:
        raise ConfigError(f"bus.grant-key-file: {str(p)!r} holds {len(key)} bytes; at least 16 are needed")
    return key


def ensure_grant_key(path: str | os.PathLike[str]) -> Path:
    """Create a random grant key file (0600, in a 0700 directory) unless one exists."""
    p = Path(path).expanduser()
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not p.exists():
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode() + b"\n")
        finally:
            os.close(fd)
    return p
