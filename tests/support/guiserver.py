"""Shared pieces of the guiServer suites: an event recorder, a host that polls, emulator and
session factories, and the ``target`` fixture (emulator, or a real guiServer named by
``FLOWBUS_GUISERVER=host:port`` with ``FLOWBUS_GUISERVER_DIR`` a scratch directory on it).

A test module gets a fixture by importing ``<name>_fixture`` from here (pytest registers it under
its declared name)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowbus.schemas import GuiserverSessionConfig
from flowbus.services.guiserver import GuiserverSession
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.recorder import Recorder

REAL = os.environ.get("FLOWBUS_GUISERVER", "")
REAL_DIR = os.environ.get("FLOWBUS_GUISERVER_DIR", "/tmp/flowbus-guiserver-test")


class Host:
    """What a BackendActor does: start the session, call ``poll`` from one worker thread."""

    def __init__(self, session: GuiserverSession, rec: Recorder) -> None:
        self.session, self.rec = session, rec
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Host:
        self.session.start(self.rec, {})
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.session.poll())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.session.stop()


@pytest.fixture(name="emulator")
def emulator_fixture(tmp_path: Path) -> Iterator[Callable[..., GuiserverEmulator]]:
    made: list[GuiserverEmulator] = []

    def make(**options: Any) -> GuiserverEmulator:
        emu = GuiserverEmulator(tmp_path / f"sandbox{len(made)}", **options).start()
        made.append(emu)
        (emu.real("/data/exp")).mkdir(parents=True)
        return emu

    yield make
    for emu in made:
        emu.stop()


@pytest.fixture(name="host")
def host_fixture() -> Iterator[Callable[..., Host]]:
    made: list[Host] = []

    def make(port: int, host_name: str = "127.0.0.1", **overrides: Any) -> Host:
        options: dict[str, Any] = {"allowed_dirs": ["/data", REAL_DIR], "request_timeout": 5.0,
                                   "reconnect_backoff": 0.05, **overrides}
        cfg = GuiserverSessionConfig(name="gs", host=host_name, port=port, **options)
        h = Host(GuiserverSession(cfg), Recorder()).start()
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture(name="target", params=["emulator", "real"])
def target_fixture(request: pytest.FixtureRequest, emulator: Callable[..., GuiserverEmulator],
           host: Callable[..., Host]) -> tuple[Host, str]:
    """A connected session and a scratch directory, on the emulator or on a real guiServer."""
    if request.param == "real":
        if not REAL:
            pytest.skip("set FLOWBUS_GUISERVER=host:port to run against a real guiServer")
        name, _, port = REAL.rpartition(":")
        h = host(int(port), name, allow_remote=True)
        h.session.call("mkdir", REAL_DIR)
        return h, REAL_DIR
    return host(emulator().port), "/data/exp"


def roundtrip(h: Host, directory: str = "/data/exp") -> list[str]:
    """An ls: every packet sent before it has been handled by the server when it returns."""
    names: list[str] = h.session.call("ls", directory)
    return names


def job_host(emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host], name: str = "job_1",
             **options: Any) -> tuple[GuiserverEmulator, Host, str]:
    """An emulator with ``/data/exp/<name>.input`` and a session on it."""
    emu = emulator(**options)
    emu.real(f"/data/exp/{name}.input").write_text("# fake\n")
    return emu, host(emu.port), f"/data/exp/{name}.input"
