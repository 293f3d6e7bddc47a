"""Liveness of a light-mode soma-workflow controller's database, probed before soma is asked.

In light mode soma's engine and "database server" run in the session's process; what can stop
answering is the sqlite database they share (``<directory>/soma-workflow.db``): a process that
holds it locked and is stopped or hung (another soma controller, a tool, a stalled file system).
Every soma call then waits up to soma's own 15 s sqlite timeout, and three such polls in a row
took some 45 s to be called a loss. :class:`DbProbe` reads the database first, on a connection of
its own with a ``probe-timeout`` busy wait (sqlite waits with the GIL released): a read that
cannot start within it means the database is ``stuck``; no soma call is made while it is; stuck
for ``request-timeout`` more seconds is a loss (``BackendTimeout``).
"""

from __future__ import annotations

import os
import sqlite3
import time

from flowbus.schemas import BackendTimeout


class DbProbe:
    """A read of soma's sqlite database, bounded by ``probe_timeout``.

    :meth:`check` is True when the database answered, False while it is stuck (locked by someone
    else for longer than ``probe_timeout``), and raises ``BackendTimeout`` once it has been stuck
    for ``probe_timeout + request_timeout``. A database that does not exist yet, or fails for
    another reason than a lock, is not stuck (soma creates it, or its own calls report it)."""

    def __init__(self, path: str, probe_timeout: float, request_timeout: float) -> None:
        self.path = path
        self.probe_timeout = probe_timeout
        self.request_timeout = request_timeout
        #: when the first unanswered probe of the current stuck spell started (monotonic)
        self.stuck_since: float | None = None

    def stuck_for(self) -> float | None:
        """Seconds the database has been stuck, or None."""
        since = self.stuck_since
        return None if since is None else time.monotonic() - since

    def check(self) -> bool:
        if not os.path.exists(self.path):
            self.stuck_since = None
            return True
        started = time.monotonic()
        try:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=self.probe_timeout,
                                  check_same_thread=False)
            try:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                con.close()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                # not a lock (e.g. a hot journal a read-only connection may not roll back): soma's
                # own calls, which may write, tell what it is
                self.stuck_since = None
                return True
            if self.stuck_since is None:
                self.stuck_since = started
            stuck = time.monotonic() - self.stuck_since
            if stuck >= self.probe_timeout + self.request_timeout:
                raise BackendTimeout(f"the soma database {self.path} is locked: no read within "
                                     f"{self.probe_timeout:g} s for {stuck:.1f} s (stuck)") from exc
            return False
        self.stuck_since = None
        return True


__all__ = ["DbProbe"]
