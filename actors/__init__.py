"""Ray actors: BackendActor (hosts adapter sessions) and Supervisor (places and watches them)."""

from ._ray import ensure_token, join_ray, ray_auth_env, start_ray, stop_ray  # first: sets the fences before ray

# isort: split
from ._backend_actor import BackendActor, BackendActorImpl
from ._supervisor import ACTOR_PREFIX, SUPERVISOR_NAME, Supervisor, SupervisorImpl, actor_pid, plan, wait_started

__all__ = [
    "ACTOR_PREFIX",
    "SUPERVISOR_NAME",
    "BackendActor",
    "BackendActorImpl",
    "Supervisor",
    "SupervisorImpl",
    "actor_pid",
    "ensure_token",
    "join_ray",
    "plan",
    "ray_auth_env",
    "start_ray",
    "stop_ray",
    "wait_started",
]
