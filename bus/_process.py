"""Running the broker as its own process: the entry point, and a handle that starts, waits for
readiness, kills and restarts it (used by ``flowbus up`` and by the tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from flowbus.schemas import BusBroken, BusConfig

from ._broker import Broker

READY = "FLOWBUS-BROKER-READY "


def _die_with_parent() -> None:
    """SIGTERM when the parent dies (Linux), so a broker whose `flowbus up` was SIGKILLed does
    not live on holding the state dir's sockets."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(config: BusConfig, journal_dir: str | None = None, *, die_with_parent: bool = False) -> None:
    """Bind, print one readiness line with the endpoints, then serve until SIGTERM/SIGINT (or,
    with ``die_with_parent``, until the process that started it is gone)."""
    parent = os.getppid()
    if die_with_parent:
        _die_with_parent()
        if os.getppid() != parent:  # it died before prctl took effect
            raise SystemExit(1)
    broker = Broker(config, journal_dir)
    try:
        endpoints = broker.bind()
    except OSError as exc:
        print(f"flowbus broker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    print(READY + json.dumps({**endpoints, "pid": os.getpid(), "broker_id": broker.broker_id}), flush=True)
    broker.run()


class BrokerProcess:
    """A broker in a child process. ``start()`` returns once it listens; ``kill()`` is SIGKILL."""

    def __init__(self, config: BusConfig, journal_dir: str | None = None, log_path: str | None = None) -> None:
        self.config = config
        self.journal_dir = journal_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.endpoints: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return str(self.endpoints["request"])

    def start(self, timeout: float = 20.0) -> dict[str, Any]:
        cfg = self.config
        if self.endpoints and cfg.transport == "tcp":  # a restart binds the same ports: clients reconnect by themselves
            cfg = msgspec.structs.replace(cfg, **{f"{k}_port": int(str(self.endpoints[k]).rsplit(":", 1)[1])
                                                  for k in ("request", "publish", "ingest", "command")
                                                  if k in self.endpoints})
        args = [sys.executable, "-m", "flowbus", "broker", "--config-json", msgspec.json.encode(cfg).decode()]
        if self.journal_dir:
            args += ["--journal-dir", self.journal_dir]
        # the log is private like the rest of the state dir (it names sources and endpoints)
        stderr = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") \
            if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True)
        if self.log_path:
            stderr.close()  # type: ignore[union-attr]  # our file when log_path is set
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(READY):
                self.endpoints = json.loads(line[len(READY):])
                return self.endpoints
            if not line and self.proc.poll() is not None:
                break
        code = self.proc.poll()
        self.kill()
        why = self._last_log_line()
        where = f" (log: {self.log_path})" if self.log_path else ""
        if code is not None:
            raise BusBroken(f"broker exited with code {code} before it was ready: {why or 'no message'}{where}")
        raise BusBroken(f"broker not ready within {timeout:g} s{where}")

    def _last_log_line(self) -> str:
        if not self.log_path:
            return ""
        try:
            lines = [ln.strip() for ln in Path(self.log_path).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def write_runfile(self, path: str | os.PathLike[str], **extra: Any) -> None:
        Path(path).write_text(json.dumps({**self.endpoints, **extra}, indent=2))
