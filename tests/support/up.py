"""A real `flowbus up` in a child process for tests that use the CLI as a user does: its own state
dir and config, one local QCG session, stopped by SIGTERM with every process it started gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

FLOWBUS = [sys.executable, "-m", "flowbus"]


@dataclass
class Up:
    """A running `flowbus up`: ``env`` reaches it (FLOWBUS_STATE_DIR), ``out``/``err`` are its
    stdout and stderr files; ``code`` and ``stdout`` are set once it has stopped."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    state: Path
    out: Path
    err: Path
    code: int | None = None
    left: list[int] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    def err_tail(self) -> str:
        return self.err.read_text()[-2000:]


def config(tmp_path: Path, namespace: str, extra: str = "") -> Path:
    """A config with the state dir under ``tmp_path``, its own Ray namespace and one QCG session
    ``local``; ``extra`` is TOML added before the session (e.g. a ``[dashboard]`` table)."""
    cfg = tmp_path / "flowbus.toml"
    cfg.write_text(f"""
state-dir = "{tmp_path / 'state'}"
[ray]
namespace = "{namespace}"
{extra}
[[sessions]]
backend = "qcg"
name = "local"
wd = "{tmp_path / 'qcg'}"
""")
    return cfg


@contextmanager
def running_up(tmp_path: Path, namespace: str, *, extra: str = "[metrics]\nport = 0", demo: bool = False,
               args: tuple[str, ...] = ("--json", "--duration", "240"), start_timeout: float = 150) -> Iterator[Up]:
    """Start `flowbus up`, wait for its run file, yield it; on the way out stop it by SIGTERM (killed
    after 120 s), wait up to 30 s for every process it started and record any left in ``left``."""
    cfg = config(tmp_path, namespace, extra)
    state = tmp_path / "state"
    env = {**os.environ, "FLOWBUS_STATE_DIR": str(state)}
    env.pop("FLOWBUS_ADDRESS", None)
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    with open(out, "wb") as o, open(err, "wb") as e:  # the child keeps its own copies
        proc = subprocess.Popen([*FLOWBUS, "up", "--config", str(cfg), *(["--demo"] if demo else []), *args],
                                env=env, stdout=o, stderr=e)
    up = Up(proc, env, state, out, err)
    runfile = state / "run.json"
    try:
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and not runfile.exists() and proc.poll() is None:
            time.sleep(0.2)  # waiting for another process to reach a state; no event to arm here
        assert runfile.exists(), f"flowbus up did not start: {up.err_tail()}"
        yield up
    finally:
        kids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            up.code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            up.code = proc.wait(10)
        _, alive = psutil.wait_procs(_processes(kids), timeout=30)
        up.left = [p.pid for p in alive if _lives(p)]


def _processes(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return found


def _lives(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


__all__ = ["FLOWBUS", "Up", "config", "running_up"]
