"""Parsl site classes for ctrl_bps (``site.<computeSite>.class``) that open no sockets.

The stock ``lsst.ctrl.bps.parsl.sites.Local`` runs a ``HighThroughputExecutor`` whose interchange
listens on every interface; :class:`LocalThreads` runs each job's bash command from a thread of
this process instead (no listener, no forked Python, about 0.5 s per small workflow). It is the
default site of a :class:`~flowbus.services.wms.WmsSession`, and users of plain ``bps`` can name
it too: ``site: {local: {class: flowbus.services.wms.LocalThreads, cores: 4}}``.
"""

from __future__ import annotations

from typing import Any

from lsst.ctrl.bps.parsl.configuration import get_bps_config_value
from lsst.ctrl.bps.parsl.site import SiteConfig
from parsl.executors import ThreadPoolExecutor

#: the label of the one executor
EXECUTOR_LABEL = "local"


class LocalThreads(SiteConfig):  # type: ignore[misc]  # SiteConfig: lsst, untyped
    """Jobs run on this host from a pool of ``site.<computeSite>.cores`` threads (default 2).

    No socket is opened and no Python process is forked: each job is one ``/bin/bash`` child
    started by Parsl's bash app. ``retries``, ``run_dir`` and ``commandPrefix`` keep their
    ``SiteConfig`` meaning.
    """

    def get_executors(self) -> list[Any]:
        cores = get_bps_config_value(self.site, "cores", int, 2)
        return [ThreadPoolExecutor(label=EXECUTOR_LABEL, max_threads=max(1, cores))]

    def select_executor(self, job: Any) -> str:
        return EXECUTOR_LABEL

    def get_address(self) -> str:
        return "127.0.0.1"


__all__ = ["EXECUTOR_LABEL", "LocalThreads"]
