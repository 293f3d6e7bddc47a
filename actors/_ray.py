"""Starting or joining Ray, loopback-only by default (see notes/ray-deploy.md §1.1, §1.9).

This module sets the fences before Ray is imported anywhere in the process: without
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` a local Ray listens on every interface.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import logging  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
import structlog  # noqa: E402

from flowbus.schemas import BusBroken, RayConfig  # noqa: E402

log = structlog.get_logger("flowbus.ray")

# Ray Client's proxy starts one server per driver, and now and then loses it at birth (a fork
# race in the proxy, ray-project/ray#63202): the driver gets "Initialization failure from
# server" after ~30 s; a new connection usually works
CLIENT_ATTEMPTS = 3
JOIN_PROBE_TIMEOUT = 5.0

FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


def start_ray(cfg: RayConfig) -> str:
    """``address = "local"``: a private Ray on 127.0.0.1; otherwise join ``cfg.address``.
    Returns the GCS address other drivers (the CLI) can join."""
    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    common: dict[str, Any] = {"namespace": cfg.namespace, "logging_level": logging.ERROR, "log_to_driver": False,
              "include_dashboard": False}
    try:
        if cfg.address == "local":
            ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_mb * 2**20,
                     _temp_dir=tempfile.mkdtemp(prefix="fbray-", dir="/tmp"), _system_config=FAST_HEALTH,
                     **common)
        else:
            _probe(cfg)
            if cfg.address.startswith("ray://"):
                _client_init(cfg.address, cfg.namespace)
            else:
                ray.init(address=cfg.address, **{k: v for k, v in common.items() if k != "include_dashboard"})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BusBroken(f"ray: cannot start or join a cluster at {cfg.address!r}: {exc}") from exc
    if cfg.address.startswith("ray://"):
        return cfg.address  # a Ray Client driver has no GCS address of its own
    return str(ray.get_runtime_context().gcs_address)


def _probe(cfg: RayConfig) -> None:
    """Fail within ``connect-timeout`` seconds for an unreachable cluster (``ray.init`` waits ~80 s)."""
    from ._placement import probe_address

    address = cfg.address
    if address.startswith("ray://"):
        from ray._private.utils import get_ray_client_dependency_error

        missing = get_ray_client_dependency_error()
        if missing is not None:
            raise ConnectionError(f"a ray:// address needs the Ray Client (pip package ray[client]: {missing}); "
                                  "or give the cluster's GCS address, host:6379")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address("auto")
        if resolved is None:
            raise ConnectionError("address 'auto': no running Ray cluster found (RAY_ADDRESS is unset and none was "
                                  "started on this machine)")
        address = resolved
    probe_address(address, cfg.connect_timeout)


def _client_init(address: str, namespace: str) -> None:
    """``ray.init`` through Ray Client, retried when the server failed to start this driver's server."""
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)
            return
        except ConnectionAbortedError as exc:
            # the server's traceback ends with its reason, e.g. "Starting Ray client server failed. See ..."
            why = next((ln.strip() for ln in reversed(str(exc).splitlines()) if ln.strip()), type(exc).__name__)
            if attempt == CLIENT_ATTEMPTS:
                raise ConnectionError(f"the Ray Client server could not start a server for this driver "
                                      f"({attempt} attempts; last: {why}); see ray_client_server*.err in the "
                                      f"head's Ray logs") from exc
            log.warning("ray.client.init_failed", address=address, attempt=attempt, error=why[:300])


def join_ray(address: str, namespace: str) -> None:
    """Join a running cluster as a driver (the CLI joining ``flowbus up``); BusBroken if it cannot
    (within ``JOIN_PROBE_TIMEOUT`` s when nothing listens there any more)."""
    from ._placement import probe_address

    if ray.is_initialized():
        return
    try:
        probe_address(address, JOIN_PROBE_TIMEOUT)
        if address.startswith("ray://"):
            _client_init(address, namespace)
        else:
            ray.init(address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BusBroken(f"ray: cannot join the cluster of `flowbus up` at {address!r}: {exc}") from exc


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
