"""The Orchestrator Ray actor: a thin shell around :class:`~flowbus.actors.rules.OrchestratorCore`.

The rules engine, the recovery policies and the core that runs them against the bus are in
:mod:`flowbus.actors.rules` (no Ray there: ``flowbus.rules`` runs the same core in your own
process). This actor compiles the config file's ``[[rules]]``/``[[policies]]``, runs their calls
through the Supervisor, publishes under a granted source, and resumes from its checkpoint when
Ray restarts it.
"""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

import msgspec
import structlog

from . import _ray  # noqa: F401  (loopback fences before ray)

# isort: split
import ray

from flowbus.bus import ClientCurve, grant_key_file, load_grant_key, make_grant
from flowbus.schemas import Backend, FlowbusConfig

from ._supervisor import call_through
from .rules import (
    CHECKPOINT_FILE,
    ORCHESTRATOR_NAME,
    ORCHESTRATOR_SOURCE,
    CallSpec,
    OrchestratorCore,
    catalog_for,
    compile_policies,
    compile_rules,
)

log = structlog.get_logger("flowbus.orchestrator")


class OrchestratorImpl:
    """Ray actor hosting an :class:`OrchestratorCore` for the config's rules and policies.

    The constructor only stores the configuration and starts a thread that calls :meth:`start`,
    so an actor that Ray restarted resumes from its checkpoint without anyone calling it."""

    def __init__(self, config_json: bytes, broker_address: str, curve: Any = None, *,
                 supervisor: str = "flowbus-supervisor", checkpoint: str = "", auto_start: bool = True,
                 since: dict[str, int] | None = None) -> None:
        self.config = msgspec.json.decode(config_json, type=FlowbusConfig)
        self.since = since
        self.broker_address = broker_address
        self.curve = curve if curve is not None else ClientCurve.from_config(self.config.bus.curve)
        self.supervisor_name = supervisor
        self.checkpoint = checkpoint or str(self.config.state_path() / "orchestrator" / CHECKPOINT_FILE)
        self.core: OrchestratorCore | None = None
        self.failure = ""
        self._start_lock = threading.Lock()
        self._supervisor: Any = None
        if auto_start:
            threading.Thread(target=self._auto_start, name="flowbus-orchestrator-start", daemon=True).start()

    def _auto_start(self) -> None:
        try:
            self.start()
        except Exception as exc:  # noqa: BLE001 - visible through ping()
            self.failure = "".join(traceback.format_exception_only(exc)).strip()
            log.error("orchestrator.start_failed", error=self.failure)

    def _call(self, spec: CallSpec) -> Any:
        if self._supervisor is None:
            self._supervisor = ray.get_actor(self.supervisor_name)
        return call_through(self._supervisor, spec.session, spec.operation, spec.args, spec.kwargs, spec.timeout)

    def start(self) -> dict[str, Any]:
        """Compile the rules (bad ones are rejected by name), resume, and follow the bus (idempotent)."""
        with self._start_lock:
            if self.core is None:
                catalog = catalog_for(self.config)
                rules, rejected = compile_rules(self.config.rules, catalog)
                policies, bad = compile_policies(self.config.policies, catalog)
                # flowbus's own orchestrator publishes under a granted source: a restart by Ray
                # takes it over at once, and no user script can take it
                key_file = grant_key_file(self.config.bus.grant_key_file, self.broker_address, self.curve)
                grant = make_grant(load_grant_key(key_file), ORCHESTRATOR_SOURCE, Backend.FLOWBUS.value) \
                    if key_file else None
                core = OrchestratorCore(self.broker_address, rules=rules, policies=policies,
                                        rejected={**rejected, **bad}, caller=self._call, checkpoint=self.checkpoint,
                                        curve=self.curve, sessions=dict(catalog.sessions or {}), since=self.since,
                                        grant=grant)
                core.start()
                self.core = core
                self.failure = ""
        return self.ping()

    def ping(self) -> dict[str, Any]:
        core = self.core
        return {"pid": os.getpid(), "started": core is not None and core.running, "failure": self.failure,
                "rules": sorted(core.engine.rules) if core else [], "rejected": dict(core.rejected) if core else {}}

    def status(self) -> dict[str, Any]:
        return self.core.status() if self.core else {"started": False, "failure": self.failure}

    def call(self, session: str, operation: str, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None,
             timeout: float = 120.0) -> Any:
        """Run a backend operation through the orchestrator (QCG submissions become retryable)."""
        if self.core is None:
            self.start()
        assert self.core is not None
        return self.core.call(CallSpec(session=session, operation=operation, args=list(args or []),
                                       kwargs=dict(kwargs or {}), timeout=timeout))

    def stop(self) -> None:
        if self.core is not None:
            self.core.stop()

    def kill(self) -> None:
        try:
            self.stop()
        except Exception as exc:  # noqa: BLE001 - kill never raises
            log.error("orchestrator.kill_failed", error=str(exc)[:300])


Orchestrator = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)(OrchestratorImpl)  # type: ignore[call-overload]  # Ray stubs lack actor options


__all__ = ["ORCHESTRATOR_NAME", "Orchestrator", "OrchestratorImpl"]
