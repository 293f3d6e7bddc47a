"""Ray actors: BackendActor (hosts adapter sessions), Supervisor (places and watches them) and
Orchestrator (runs the rules engine of :mod:`flowbus.actors.rules`, which needs no Ray).

Importing this package sets the Ray fences (``_fences``: loopback only, token auth) and nothing
else; the names below are loaded from their modules on first use, so ``flowbus.actors.rules`` and
``flowbus.rules`` work without importing Ray. Every module here that imports Ray imports ``_ray``
(and so the fences) before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _fences  # noqa: F401 - first: the fences are set before anything can import ray

# isort: split
from flowbus.schemas import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from ._backend_actor import BackendActor, BackendActorImpl
    from ._orchestrator import Orchestrator, OrchestratorImpl
    from ._placement import ActorPlan, check_fit, make_plan, probe_address
    from ._ray import ensure_token, join_ray, ray_auth_env, start_ray, stop_ray
    from ._supervisor import (
        ACTOR_PREFIX,
        SUPERVISOR_NAME,
        Supervisor,
        SupervisorImpl,
        actor_pid,
        call_through,
        plan,
        supervisor_options,
        wait_started,
    )

_WHERE = {
    "BackendActor": "_backend_actor", "BackendActorImpl": "_backend_actor",
    "Orchestrator": "_orchestrator", "OrchestratorImpl": "_orchestrator",
    "ActorPlan": "_placement", "check_fit": "_placement", "make_plan": "_placement", "probe_address": "_placement",
    "ensure_token": "_ray", "join_ray": "_ray", "ray_auth_env": "_ray", "start_ray": "_ray", "stop_ray": "_ray",
    "ACTOR_PREFIX": "_supervisor", "SUPERVISOR_NAME": "_supervisor", "Supervisor": "_supervisor",
    "SupervisorImpl": "_supervisor", "actor_pid": "_supervisor", "call_through": "_supervisor", "plan": "_supervisor",
    "supervisor_options": "_supervisor", "wait_started": "_supervisor",
}


__getattr__ = _lazy_exports(__name__, globals(), _WHERE)

__all__ = [
    "ACTOR_PREFIX",
    "SUPERVISOR_NAME",
    "ActorPlan",
    "BackendActor",
    "BackendActorImpl",
    "Orchestrator",
    "OrchestratorImpl",
    "Supervisor",
    "SupervisorImpl",
    "actor_pid",
    "call_through",
    "check_fit",
    "ensure_token",
    "join_ray",
    "make_plan",
    "plan",
    "probe_address",
    "ray_auth_env",
    "start_ray",
    "stop_ray",
    "supervisor_options",
    "wait_started",
]
