"""flowbus: one typed, replayable event stream over scientific workflow managers.

``client = flowbus.connect("tcp://127.0.0.1:7750")`` gives subscriptions, callbacks and waits;
the building blocks live in ``flowbus.schemas``, ``flowbus.bus``, ``flowbus.services`` and
``flowbus.actors``.
"""

from __future__ import annotations

from typing import Any

from flowbus.bus import DEFAULT_ADDRESS, Client, Match
from flowbus.schemas import Event, State, WaitTimeout

__version__ = "0.1.0"


def connect(address: str | None = None, **kwargs: Any) -> Client:
    """A client of the broker whose request endpoint is ``address``.

    Without an address: ``$FLOWBUS_ADDRESS``, else the address ``flowbus up`` wrote to its run
    file, else ``tcp://127.0.0.1:7750``.
    """
    from flowbus._runfile import resolve_address

    return Client(address or resolve_address(), **kwargs)


__all__ = ["DEFAULT_ADDRESS", "Client", "Event", "Match", "State", "WaitTimeout", "__version__", "connect"]
