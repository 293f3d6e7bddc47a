"""Which of our processes listen beyond loopback (used by fixtures and tests)."""

from __future__ import annotations

import psutil


def _is_loopback(ip: str) -> bool:
    ip = ip.removeprefix("::ffff:")
    return ip.startswith("127.") or ip == "::1"


def off_loopback_listeners(root: psutil.Process | None = None) -> list[str]:
    """Listening sockets of this process and all its descendants that are not on loopback."""
    me = root or psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    bad = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections("inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and not _is_loopback(c.laddr.ip):
                bad.append(f"pid {pid} ({process_name(pid)}) listens on {c.laddr.ip}:{c.laddr.port}")
    return bad


def process_name(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:80]
    except psutil.Error:
        return "?"
