"""Isolation inside one BackendActor: a backend that stops answering costs the other sessions of
its actor nothing. Real ecflow_servers, a real broker, one BackendActorImpl (the body of the Ray
actor, in this process so that it shares this process's GIL with the frozen session): a server
SIGSTOPped and a server that accepts connections but never replies (tests/support/silent.py, a
child process) are reported ``stuck`` and then ``Disconnected`` while the neighbours' changes
keep arriving. Behaviour, not timing goals (those are in bench/scale.py, ``frozen_ratio``)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from flowbus.bus import Subscriber
from flowbus.schemas import (
    AttributeChanged,
    Connected,
    Disconnected,
    EcflowSessionConfig,
    Event,
    GuiserverSessionConfig,
    SomaSessionConfig,
    State,
    StateChanged,
    WmsSessionConfig,
)
from flowbus.services.guiserver import messages as gx
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support import db_lock as _dbl
from support import ecflow as _fx
from support import gs_process as _gsp
from support import guiserver as _gs
from support import silent as _silent
from support import wms_remote as _wms
from support.db_lock import DbLocker
from support.ecflow import EcfServer
from support.gs_process import EmulatorProcess
from support.silent import SilentServer
from support.wms_remote import EchoServer

ecf_server = _fx.ecf_server
silent_server = _silent.silent_server
emulator_process = _gsp.emulator_process
emulator = _gs.emulator_fixture
echo_server = _wms.echo_server
db_locker = _dbl.db_locker


def _spec(name: str, port: int, **kw: Any) -> dict[str, Any]:
    spec = msgspec.to_builtins(EcflowSessionConfig(name=name, host="127.0.0.1", port=port, poll_interval=0.1,
                                                   timeout=1.0, **kw))
    spec["backend"] = "ecflow"
    return dict(spec)


def _labelled(server: EcfServer) -> None:
    path = server.home / "s.def"
    path.write_text("suite s\n  task t\n    label info \"\"\nendsuite\n")
    server.client().load(_fx.ecflow.Defs(str(path)))


class _Watch:
    """Every event from the ``ecflow/`` topics, collected while waiting for one."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub, self.events = sub, list[Event]()

    def until(self, pred: Callable[[Event], bool], timeout: float, what: str,
              also: Callable[[], None] | None = None) -> Event:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            if also is not None:
                also()
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
            self.events += self.sub.recv_many(0.2)


class TestFrozenNeighbour:
    @pytest.mark.timeout(180)
    def test_frozen_and_silent_servers_are_stuck_while_neighbours_events_flow(
            self, broker_factory: Any, ecf_server: Callable[..., EcfServer],
            silent_server: Callable[[], SilentServer]) -> None:
        """One actor, four ecFlow sessions: two healthy servers, one SIGSTOPped after opening
        (request-timeout 10 s, so a blocking client call would hold this process's GIL for 10 s)
        and one silent server. The silent one opens Disconnected ("stuck"); the frozen one is
        named by ping() under ``stuck``, and while it is, a change on each healthy server reaches
        the bus; only then is the frozen one Disconnected. After SIGCONT it reconnects."""
        from flowbus.actors import _backend_actor as ba

        broker = broker_factory()
        healthy = [ecf_server(), ecf_server()]
        victim = ecf_server()
        for s in (*healthy, victim):
            _labelled(s)
        quiet = silent_server()
        assert not quiet.answers()
        specs = [_spec("ok0", healthy[0].port), _spec("ok1", healthy[1].port),
                 _spec("frozen", victim.port, request_timeout=10, probe_timeout=0.5),
                 _spec("silent", quiet.port, request_timeout=10, probe_timeout=0.5)]
        loop = asyncio.new_event_loop()
        impl = ba.BackendActorImpl("iso", broker.address, specs, poll_workers=4, open_concurrency=4)
        sub = Subscriber(broker.address, "ecflow/", start="live")
        watch = _Watch(sub)
        assert victim.proc is not None
        stopped = False
        try:
            info = loop.run_until_complete(asyncio.wait_for(impl.start(), 120))
            assert sorted(info["sessions"]) == ["frozen", "ok0", "ok1", "silent"]
            gone = watch.until(lambda e: isinstance(e, Disconnected) and e.source == "silent", 30,
                               "the silent server's session to be Disconnected")
            assert "stuck" in gone.reason, gone  # type: ignore[attr-defined]
            assert "silent" in loop.run_until_complete(impl.ping())["stuck"]

            os.kill(victim.proc.pid, signal.SIGSTOP)
            stopped = True

            def stuck_named() -> bool:
                return "frozen" in loop.run_until_complete(impl.ping())["stuck"]
            deadline = time.monotonic() + 20
            while not stuck_named():
                assert time.monotonic() < deadline, "ping() never named the frozen session under stuck"
                watch.events += sub.recv_many(0.1)
            for k, s in enumerate(healthy):
                s.client().alter("/s/t", "change", "label", "info", f"during{k}")
            def changed(k: int) -> Callable[[Event], bool]:
                return lambda e: isinstance(e, AttributeChanged) and e.source == f"ok{k}" and e.value == f"during{k}"
            for k in range(2):
                watch.until(changed(k), 20, f"ok{k}'s change while frozen is stuck")
            frozen_gone = [e for e in watch.events if isinstance(e, Disconnected) and e.source == "frozen"]
            assert not frozen_gone, "the neighbours' changes came only after the frozen session was given up"
            assert stuck_named()
            lost = watch.until(lambda e: isinstance(e, Disconnected) and e.source == "frozen", 30,
                               "the frozen session to be Disconnected")
            assert "stuck" in lost.reason  # type: ignore[attr-defined]
            os.kill(victim.proc.pid, signal.SIGCONT)
            stopped = False
            deadline = time.monotonic() + 30
            while stuck_named():
                assert time.monotonic() < deadline, "the thawed server's session stayed stuck"
                watch.events += sub.recv_many(0.1)
        finally:
            sub.close()
            if stopped:
                os.kill(victim.proc.pid, signal.SIGCONT)
            try:
                loop.run_until_complete(asyncio.wait_for(impl.stop(), 120))
            finally:
                impl._pool.shutdown(wait=True)
                loop.close()


# -- guiServer (our emulator in a process of its own; healthy neighbours in this process) ----------------


def _gs_spec(name: str, port: int, **kw: Any) -> dict[str, Any]:
    spec = msgspec.to_builtins(GuiserverSessionConfig(name=name, port=port, reconnect_backoff=0.2, **kw))
    spec["backend"] = "guiserver"
    return dict(spec)


class TestFrozenGuiserver:
    @pytest.mark.timeout(180)
    def test_sigstopped_and_silent_guiservers_are_stuck_while_neighbours_events_flow(
            self, broker_factory: Any, emulator: Callable[..., GuiserverEmulator],
            emulator_process: Callable[[], EmulatorProcess], silent_server: Callable[[], SilentServer]) -> None:
        """One actor, four guiServer sessions (request-timeout 10 s): two healthy emulators, one
        emulator process SIGSTOPped after opening and one silent listener. The silent one is
        named under ``stuck`` while its handshake waits and opens Disconnected; the frozen one is
        named under ``stuck`` once its probe goes unanswered, and while it is, a DiFX message
        relayed by each healthy server reaches the bus; only then is the frozen one
        Disconnected. After SIGCONT it reconnects."""
        from flowbus.actors import _backend_actor as ba

        broker = broker_factory()
        healthy = [emulator(), emulator()]
        victim = emulator_process()
        quiet = silent_server()
        specs = [_gs_spec("ok0", healthy[0].port), _gs_spec("ok1", healthy[1].port),
                 _gs_spec("frozen", victim.port, request_timeout=10),
                 _gs_spec("silent", quiet.port, request_timeout=10)]
        loop = asyncio.new_event_loop()
        impl = ba.BackendActorImpl("iso-gs", broker.address, specs, poll_workers=4, open_concurrency=4)
        sub = Subscriber(broker.address, "guiserver/", start="live")
        watch = _Watch(sub)

        def stuck() -> dict[str, float]:
            return dict(loop.run_until_complete(impl.ping())["stuck"])
        try:
            opening = loop.create_task(impl.start())
            deadline = time.monotonic() + 20
            while "silent" not in impl._stuck():  # the handshake waits; ping runs on the loop meanwhile
                assert time.monotonic() < deadline, "the silent server's handshake was never named stuck"
                loop.run_until_complete(asyncio.sleep(0.05))
            info = loop.run_until_complete(asyncio.wait_for(opening, 120))
            assert sorted(info["sessions"]) == ["frozen", "ok0", "ok1", "silent"]
            gone = watch.until(lambda e: isinstance(e, Disconnected) and e.source == "silent", 30,
                               "the silent server's session to be Disconnected")
            assert "did not respond" in gone.reason.lower(), gone  # type: ignore[attr-defined]
            watch.until(lambda e: isinstance(e, Connected) and e.source == "frozen", 30, "the frozen one to open")

            victim.freeze()
            deadline = time.monotonic() + 20
            while "frozen" not in stuck():
                assert time.monotonic() < deadline, "ping() never named the frozen session under stuck"
                watch.events += sub.recv_many(0.1)

            def changed(k: int) -> Callable[[Event], bool]:
                return lambda e: isinstance(e, StateChanged) and e.source == f"ok{k}" and e.key == f"during{k}"
            for k, emu in enumerate(healthy):
                def relay(emu: GuiserverEmulator = emu, k: int = k) -> None:
                    emu.inject(gx.status_message(f"during{k}", "Running"))
                watch.until(changed(k), 20, f"ok{k}'s relayed message while frozen is stuck", also=relay)
            frozen_gone = [e for e in watch.events if isinstance(e, Disconnected) and e.source == "frozen"]
            assert not frozen_gone, "the neighbours' events came only after the frozen session was given up"
            assert "frozen" in stuck()
            lost = watch.until(lambda e: isinstance(e, Disconnected) and e.source == "frozen", 30,
                               "the frozen session to be Disconnected")
            assert "did not respond" in lost.reason.lower(), lost  # type: ignore[attr-defined]
            victim.thaw()
            watch.until(lambda e: isinstance(e, Connected) and e.source == "frozen" and e.seq > lost.seq, 60,
                        "the thawed server's session to reconnect")
            assert "frozen" not in stuck()
        finally:
            sub.close()
            victim.thaw()
            try:
                loop.run_until_complete(asyncio.wait_for(impl.stop(), 120))
            finally:
                impl._pool.shutdown(wait=True)
                loop.close()


# -- ctrl_bps WMS (a reporting service whose ping()/report() reach a server process) -------------------


def _wms_spec(name: str, service_class: str, submit_dir: Path, **kw: Any) -> dict[str, Any]:
    spec = msgspec.to_builtins(WmsSessionConfig(name=name, service_class=service_class, report_interval=0.2,
                                                submit_dir=str(submit_dir / name), **kw))
    spec["backend"] = "wms"
    return dict(spec)


class TestFrozenWms:
    @pytest.mark.timeout(180)
    def test_sigstopped_and_silent_wms_servers_are_stuck_while_neighbours_events_flow(
            self, broker_factory: Any, echo_server: Callable[[], EchoServer],
            silent_server: Callable[[], SilentServer], tmp_path: Path) -> None:
        """One actor, four WMS sessions of a service whose ping() and report() block on their
        server (request-timeout 15 s): two healthy servers, one SIGSTOPped after opening and one
        silent listener. The silent one is named under ``stuck`` and opens Disconnected; the
        frozen one is named under ``stuck`` once its ping hangs, and while it is, a run submitted
        to each healthy session reports its jobs; only then is the frozen one Disconnected.
        After SIGCONT it reconnects."""
        from flowbus.actors import _backend_actor as ba

        broker = broker_factory()
        healthy = [echo_server(), echo_server()]
        victim = echo_server()
        quiet = silent_server()
        ports = {"ok0": healthy[0].port, "ok1": healthy[1].port, "frozen": victim.port, "silent": quiet.port}
        classes = {n: _wms.remote_service(f"Iso{n.capitalize()}", port) for n, port in ports.items()}
        specs = [_wms_spec(n, c, tmp_path, request_timeout=15) for n, c in classes.items()]
        loop = asyncio.new_event_loop()
        impl = ba.BackendActorImpl("iso-wms", broker.address, specs, poll_workers=4, open_concurrency=4)
        sub = Subscriber(broker.address, "wms/", start="live")
        watch = _Watch(sub)

        def stuck() -> dict[str, float]:
            return dict(loop.run_until_complete(impl.ping())["stuck"])
        try:
            opening = loop.create_task(impl.start())
            deadline = time.monotonic() + 20
            while "silent" not in impl._stuck():  # its first ping hangs; ping runs on the loop meanwhile
                assert time.monotonic() < deadline, "the silent WMS's ping was never named stuck"
                loop.run_until_complete(asyncio.sleep(0.05))
            info = loop.run_until_complete(asyncio.wait_for(opening, 120))
            assert sorted(info["sessions"]) == ["frozen", "ok0", "ok1", "silent"]
            gone = watch.until(lambda e: isinstance(e, Disconnected) and e.source == "silent", 30,
                               "the silent WMS's session to be Disconnected")
            assert "stuck" in gone.reason, gone  # type: ignore[attr-defined]
            watch.until(lambda e: isinstance(e, Connected) and e.source == "frozen", 30, "the frozen one to open")

            victim.freeze()
            deadline = time.monotonic() + 20
            while "frozen" not in stuck():
                assert time.monotonic() < deadline, "ping() never named the frozen session under stuck"
                watch.events += sub.recv_many(0.1)
            for k in range(2):
                wms_id = loop.run_until_complete(impl.call(
                    f"ok{k}", "submit_workflow", {"name": f"during{k}", "jobs": [{"name": "a", "command": ["true"]}]}))
                watch.until(lambda e, k=k, w=wms_id["wms_id"]: isinstance(e, StateChanged)  # type: ignore[misc]
                            and e.source == f"ok{k}" and e.key == w and e.native == "SUCCEEDED", 20,
                            f"ok{k}'s run to be reported while frozen is stuck")
            frozen_gone = [e for e in watch.events if isinstance(e, Disconnected) and e.source == "frozen"]
            assert not frozen_gone, "the neighbours' events came only after the frozen session was given up"
            assert "frozen" in stuck()
            lost = watch.until(lambda e: isinstance(e, Disconnected) and e.source == "frozen", 30,
                               "the frozen session to be Disconnected")
            assert "stuck" in lost.reason, lost  # type: ignore[attr-defined]
            victim.thaw()
            watch.until(lambda e: isinstance(e, Connected) and e.source == "frozen" and e.seq > lost.seq, 60,
                        "the thawed server's session to reconnect")
            assert "frozen" not in stuck()
        finally:
            sub.close()
            victim.thaw()
            try:
                loop.run_until_complete(asyncio.wait_for(impl.stop(), 120))
            finally:
                impl._pool.shutdown(wait=True)
                loop.close()


# -- soma-workflow (light mode: its database, locked by a process that then stops) ---------------------


def _soma_spec(name: str, directory: Path, **kw: Any) -> dict[str, Any]:
    spec = msgspec.to_builtins(SomaSessionConfig(name=name, directory=str(directory / name), poll_interval=0.1,
                                                 engine_refresh=0.05, recovery_backoff=0.2, **kw))
    spec["backend"] = "soma"
    return dict(spec)


class TestFrozenSoma:
    @pytest.mark.timeout(180)
    # soma's own engine loop thread dies of the locked database (soma's DatabaseError, unhandled in
    # its thread); the session replaces the controller when it reconnects
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
    def test_a_locked_database_is_stuck_while_neighbours_workflows_run(
            self, broker_factory: Any, db_locker: Callable[[Path], DbLocker], tmp_path: Path) -> None:
        """One actor, three light-mode soma sessions: two healthy, and one whose database a
        process locks and then stops in (request-timeout 15 s). The frozen one is named under
        ``stuck``, and while it is, a workflow submitted to each healthy session runs to its
        end; only then is the frozen one Disconnected. Once the lock holder is gone it
        reconnects."""
        from flowbus.actors import _backend_actor as ba

        broker = broker_factory()
        specs = [_soma_spec("ok0", tmp_path), _soma_spec("ok1", tmp_path),
                 _soma_spec("frozen", tmp_path, request_timeout=15)]
        loop = asyncio.new_event_loop()
        impl = ba.BackendActorImpl("iso-soma", broker.address, specs, poll_workers=4, open_concurrency=3)
        sub = Subscriber(broker.address, "soma/", start="live")
        watch = _Watch(sub)

        def stuck() -> dict[str, float]:
            return dict(loop.run_until_complete(impl.ping())["stuck"])
        try:
            info = loop.run_until_complete(asyncio.wait_for(impl.start(), 120))
            assert sorted(info["sessions"]) == ["frozen", "ok0", "ok1"]
            watch.until(lambda e: isinstance(e, Connected) and e.source == "frozen", 30, "the frozen one to open")
            locker = db_locker(tmp_path / "frozen" / "soma-workflow.db")
            deadline = time.monotonic() + 20
            while "frozen" not in stuck():
                assert time.monotonic() < deadline, "ping() never named the frozen session under stuck"
                watch.events += sub.recv_many(0.1)
            for k in range(2):
                wf = loop.run_until_complete(impl.call(f"ok{k}", "submit_workflow", {
                    "name": f"during{k}", "jobs": [{"name": "a", "command": ["true"]},
                                                   {"name": "b", "command": ["true"], "after": ["a"]}]}))
                watch.until(lambda e, k=k, wf=wf: isinstance(e, StateChanged)  # type: ignore[misc]
                            and e.source == f"ok{k}" and e.key == str(wf) and e.state is State.COMPLETE, 30,
                            f"ok{k}'s workflow to end while frozen is stuck")
            frozen_gone = [e for e in watch.events if isinstance(e, Disconnected) and e.source == "frozen"]
            assert not frozen_gone, "the neighbours' workflows ended only after the frozen session was given up"
            assert "frozen" in stuck()
            lost = watch.until(lambda e: isinstance(e, Disconnected) and e.source == "frozen", 40,
                               "the frozen session to be Disconnected")
            assert "stuck" in lost.reason, lost  # type: ignore[attr-defined]
            locker.end()
            watch.until(lambda e: isinstance(e, Connected) and e.source == "frozen" and e.seq > lost.seq, 60,
                        "the session to reconnect once the database is free")
            assert "frozen" not in stuck()
        finally:
            sub.close()
            try:
                loop.run_until_complete(asyncio.wait_for(impl.stop(), 120))
            finally:
                impl._pool.shutdown(wait=True)
                loop.close()


class TestLivenessKeys:
    def test_soma_and_wms_liveness_keys_load_and_are_checked(self) -> None:
        """probe-timeout/request-timeout (soma) and request-timeout (WMS) load in kebab case; a
        value that would make no verdict possible is a ConfigError naming the keys."""
        from flowbus.schemas import ConfigError, parse_config

        cfg = parse_config({"sessions": [{"backend": "soma", "name": "s", "probe-timeout": 0.2, "request-timeout": 3},
                                         {"backend": "wms", "name": "w", "request-timeout": 4}]})
        soma, wms = cfg.sessions
        assert isinstance(soma, SomaSessionConfig) and (soma.probe_timeout, soma.request_timeout) == (0.2, 3)
        assert isinstance(wms, WmsSessionConfig) and wms.request_timeout == 4
        with pytest.raises(ConfigError, match=r"sessions\[0\]: probe-timeout must be >= 0 and request-timeout > 0"):
            parse_config({"sessions": [{"backend": "soma", "name": "s", "request-timeout": 0}]})
        with pytest.raises(ConfigError, match=r"sessions\[0\]: poll-interval, report-interval and request-timeout"):
            parse_config({"sessions": [{"backend": "wms", "name": "w", "request-timeout": -1}]})
