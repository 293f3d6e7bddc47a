"""flowbus: one typed, replayable event stream over scientific workflow managers.

``client = flowbus.connect()`` (the running ``flowbus up``) gives subscriptions, callbacks, waits
and commands; the building blocks live in ``flowbus.schemas``, ``flowbus.bus``,
``flowbus.services`` and ``flowbus.actors``.

The re-exports below are loaded on first use, so ``import flowbus`` (and the CLI's fast paths)
cost no more than they use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowbus.schemas import lazy_exports as _lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from flowbus.bus import Client, Match, default_address
    from flowbus.schemas import Event, State, WaitTimeout

_LAZY = {"Client": "flowbus.bus", "Match": "flowbus.bus", "default_address": "flowbus.bus",
         "Event": "flowbus.schemas", "State": "flowbus.schemas", "WaitTimeout": "flowbus.schemas"}


__getattr__ = _lazy_exports(__name__, globals(), _LAZY)


def connect(address: str | None = None, **kwargs: Any) -> Client:
    """A client of the broker whose request endpoint is ``address``.

    Without an address: ``$FLOWBUS_ADDRESS``, else the address ``flowbus up`` wrote to its run
    file, else the embedded default's ``ipc://<state-dir>/bus/request``. A TCP broker's CurveZMQ
    keys are taken from the running ``flowbus up`` when it is the one addressed.
    """
    from flowbus._runfile import resolve_address
    from flowbus.bus import Client

    return Client(address or resolve_address(), **kwargs)


__all__ = ["Client", "Event", "Match", "State", "WaitTimeout", "__version__", "connect", "default_address"]
