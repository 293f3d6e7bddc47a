"""The guiServer emulator in a child process of its own (``python -m
flowbus.services.guiserver_emulator``), so that it can be SIGSTOPped like a real guiServer: its
stillness then costs the test process nothing. The factory fixture resumes (SIGCONT) and kills
every one it started, by PID, and waits for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowbus.demo import free_port


class EmulatorProcess:
    """One emulator child process on 127.0.0.1 (sandbox: ``sandbox``)."""

    def __init__(self, sandbox: Path) -> None:
        sandbox.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stopped = False
        self.proc = subprocess.Popen([sys.executable, "-m", "flowbus.services.guiserver_emulator",
                                      "--port", str(self.port), "--sandbox", str(sandbox)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(b"guiServer emulator on"):
            self.end()
            raise RuntimeError(f"the guiServer emulator did not start (said {line!r})")

    def freeze(self) -> None:
        """SIGSTOP: the kernel keeps its connections open and accepts new ones; nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        if self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.stopped = False

    def end(self) -> None:
        if self.proc.poll() is None:
            self.thaw()
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def emulator_process(tmp_path: Path) -> Iterator[Callable[[], EmulatorProcess]]:
    """Factory: started emulator processes; all resumed, killed (by PID) and reaped at teardown."""
    made: list[EmulatorProcess] = []

    def make() -> EmulatorProcess:
        emu = EmulatorProcess(tmp_path / f"gs-sandbox{len(made)}")
        made.append(emu)
        return emu

    yield make
    deadline = time.monotonic() + 15
    for emu in made:
        emu.end()
    assert time.monotonic() < deadline
    assert all(e.proc.poll() is not None for e in made), "a guiServer emulator process is still running"
