"""The ctrl_bps backend (``backend = "wms"``): a session on any LSST ``BaseWmsService`` by class
path (see :mod:`._session`), its operations (:mod:`._ops`), what it knows of runs and jobs and
their diff (:mod:`._model`), ctrl_bps objects built from flowbus inputs (:mod:`._build`), Parsl
runs (:mod:`._parsl`), the socket-free Parsl site (:mod:`._sites`) and the one place the
services' errors become flowbus errors (:mod:`._errors`)."""

from __future__ import annotations

from typing import Any

from ._session import WmsSession


def __getattr__(name: str) -> Any:
    # ``flowbus.services.wms.LocalThreads`` (the default ``site-class``): the socket-free Parsl
    # site, imported on first use (it imports Parsl)
    if name == "LocalThreads":
        from ._sites import LocalThreads

        return LocalThreads
    raise AttributeError(name)


__all__ = ["WmsSession"]
