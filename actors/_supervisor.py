"""Supervisor: reads the config, places sessions on BackendActors, and keeps them started.

Its watchdog pings every BackendActor; one that Ray restarted (``started`` is False again) is
told to ``start()``, which reopens its sessions and resyncs them from their backends.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgspec
import structlog

from . import _ray  # noqa: F401  (loopback fences before ray)
import ray  # noqa: E402, I001
from ray.exceptions import GetTimeoutError, RayActorError  # noqa: E402

from flowbus.bus import ClientCurve  # noqa: E402
from flowbus.schemas import FlowbusConfig, UnknownSession  # noqa: E402

from ._backend_actor import BackendActor  # noqa: E402

log = structlog.get_logger("flowbus.supervisor")

ACTOR_PREFIX = "flowbus-backend-"
SUPERVISOR_NAME = "flowbus-supervisor"


def plan(config: FlowbusConfig) -> dict[str, list[dict[str, Any]]]:
    """actor name -> session specs: sessions naming an ``actor`` share it; the others fill
    ``default-N`` actors up to ``ray.sessions-per-actor`` each."""
    groups: dict[str, list[dict[str, Any]]] = {}
    free: list[dict[str, Any]] = []
    for s in config.sessions:
        raw = msgspec.to_builtins(s)
        (groups.setdefault(s.actor, []) if s.actor else free).append(raw)
    per = max(1, config.ray.sessions_per_actor)
    for i in range(0, len(free), per):
        groups[f"default-{i // per}"] = free[i:i + per]
    return groups


class SupervisorImpl:
    def __init__(self, config_json: bytes, broker_address: str, curve: Any = None) -> None:
        self.config = msgspec.json.decode(config_json, type=FlowbusConfig)
        self.broker_address = broker_address
        # the actors' client keys for a CURVE broker come from the same [bus.curve] table
        self.curve = curve if curve is not None else ClientCurve.from_config(self.config.bus.curve)
        self.actors: dict[str, Any] = {}
        self.placement: dict[str, str] = {}
        self.restarts: dict[str, int] = {}
        self._pids: dict[str, int] = {}
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def start(self, timeout: float = 120.0) -> dict[str, str]:
        """Create the BackendActors, start them, and start the watchdog (idempotent)."""
        if not self.actors:
            for actor_name, specs in plan(self.config).items():
                handle = BackendActor.options(name=ACTOR_PREFIX + actor_name, max_restarts=self.config.ray.max_restarts,
                                              get_if_exists=True).remote(actor_name, self.broker_address, specs, self.curve)
                self.actors[actor_name] = handle
                for s in specs:
                    self.placement[s["name"]] = actor_name
        refs = {name: h.start.remote() for name, h in self.actors.items()}
        for name, ref in refs.items():
            self._pids[name] = ray.get(ref, timeout=timeout)["pid"]
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="flowbus-watchdog", daemon=True)
            self._watchdog.start()
        return dict(self.placement)

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for name, handle in list(self.actors.items()):
                try:
                    info = ray.get(handle.ping.remote(), timeout=10)
                    if not info["started"]:
                        self.restarts[name] = self.restarts.get(name, 0) + 1
                        log.warning("supervisor.actor.restarted", actor=name, pid=info["pid"])
                        self._pids[name] = ray.get(handle.start.remote(), timeout=120)["pid"]
                except (RayActorError, GetTimeoutError) as exc:
                    log.warning("supervisor.actor.unreachable", actor=name, error=str(exc)[:200])
                except Exception as exc:  # noqa: BLE001 - keep watching the others
                    log.error("supervisor.actor.start_failed", actor=name, error=str(exc)[:300])

    def where(self, session: str) -> str:
        """The actor (its Ray name) hosting ``session``."""
        if session not in self.placement:
            raise UnknownSession(session)
        return ACTOR_PREFIX + self.placement[session]

    def sessions(self) -> dict[str, str]:
        return dict(self.placement)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, handle in self.actors.items():
            try:
                out[name] = ray.get(handle.ping.remote(), timeout=5)
            except Exception as exc:  # noqa: BLE001
                out[name] = {"error": str(exc)[:200]}
            out[name]["restarts"] = self.restarts.get(name, 0)
        return out

    def call(self, session: str, operation: str, args: list[Any], kwargs: dict[str, Any], timeout: float = 120.0) -> Any:
        handle = self.actors[self.placement[session]] if session in self.placement else None
        if handle is None:
            raise UnknownSession(session)
        return ray.get(handle.call.remote(session, operation, *args, **kwargs), timeout=timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every session gracefully, then end the actors."""
        self._stop.set()
        refs = [h.stop.remote() for h in self.actors.values()]
        try:
            ray.get(refs, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - kill them anyway
            log.error("supervisor.stop.failed", error=str(exc)[:300])
        for h in self.actors.values():
            ray.kill(h, no_restart=True)
        self.actors.clear()


Supervisor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)(SupervisorImpl)  # type: ignore[call-overload]  # Ray stubs lack actor options


def actor_pid(handle: Any, timeout: float = 10.0) -> int:
    """The OS pid of a BackendActor (for fault-injection tests)."""
    return int(ray.get(handle.ping.remote(), timeout=timeout)["pid"])


def wait_started(handle: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``ping`` until the actor reports started (after a restart)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = ray.get(handle.ping.remote(), timeout=5)
            if last["started"]:
                return last  # type: ignore[no-any-return]
        except (RayActorError, GetTimeoutError) as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"actor did not report started within {timeout:g} s (last: {last})")
