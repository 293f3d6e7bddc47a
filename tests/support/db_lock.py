"""A process that holds a sqlite database locked (``BEGIN EXCLUSIVE``) and then stops: soma's
light-mode database "stops answering" (a hung tool or a stalled controller on the same
directory). The factory fixture resumes (SIGCONT) and kills every one it started, by PID, and
waits for it; the lock goes with the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_CHILD = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


class DbLocker:
    """One child process holding ``path`` under an exclusive lock, SIGSTOPped once it holds it."""

    def __init__(self, path: Path) -> None:
        self.stopped = False
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE,
                                     stdin=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"locked":
            self.end()
            raise RuntimeError(f"the lock holder did not lock {path} (said {line!r})")
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def end(self) -> None:
        """Resume and kill it (the lock is released) and reap it."""
        if self.proc.poll() is None:
            if self.stopped:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.stopped = False
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def db_locker() -> Iterator[Callable[[Path], DbLocker]]:
    """Factory: lock holders; all resumed, killed (by PID) and reaped at teardown."""
    made: list[DbLocker] = []

    def make(path: Path) -> DbLocker:
        locker = DbLocker(path)
        made.append(locker)
        return locker

    yield make
    deadline = time.monotonic() + 15
    for locker in made:
        locker.end()
    assert time.monotonic() < deadline
    assert all(x.proc.poll() is not None for x in made), "a lock holder is still running"
