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

from flowbus.schemas import BusBroken, RayConfig  # noqa: E402

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
                ray.init(address=cfg.address, namespace=cfg.namespace, logging_level=logging.ERROR, log_to_driver=False)
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


def join_ray(address: str, namespace: str) -> None:
    """Join a running cluster as a driver (the CLI joining ``flowbus up``)."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
