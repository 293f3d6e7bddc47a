"""ZeroMQ transport: broker, publisher, subscriber, journal/replay, waits, callbacks and commands.

The names below are loaded from their modules on first use, so a short-lived command (``flowbus
call``) imports only what it touches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowbus.schemas import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from ._broker import Broker
    from ._client import Callback, Client, Expectation, default_address
    from ._command_client import Commander
    from ._commands import CommandServer
    from ._curve import ClientCurve, make_keypair
    from ._grant import ensure_grant_key, grant_key_file, load_grant_key, make_grant
    from ._journal import Journal
    from ._match import Match, as_match
    from ._process import BrokerProcess, serve
    from ._publisher import Publisher
    from ._request import Requester, broker_info, same_host
    from ._subscriber import Subscriber

_WHERE = {
    "Broker": "_broker",
    "Callback": "_client", "Client": "_client", "Expectation": "_client", "default_address": "_client",
    "Commander": "_command_client",
    "CommandServer": "_commands",
    "ClientCurve": "_curve", "make_keypair": "_curve",
    "ensure_grant_key": "_grant", "grant_key_file": "_grant", "load_grant_key": "_grant", "make_grant": "_grant",
    "Journal": "_journal",
    "Match": "_match", "as_match": "_match",
    "BrokerProcess": "_process", "serve": "_process",
    "Publisher": "_publisher",
    "Requester": "_request", "broker_info": "_request", "same_host": "_request",
    "Subscriber": "_subscriber",
}


__getattr__ = _lazy_exports(__name__, globals(), _WHERE)

__all__ = [
    "Broker",
    "BrokerProcess",
    "Callback",
    "Client",
    "ClientCurve",
    "CommandServer",
    "Commander",
    "Expectation",
    "Journal",
    "Match",
    "Publisher",
    "Requester",
    "Subscriber",
    "as_match",
    "broker_info",
    "default_address",
    "ensure_grant_key",
    "grant_key_file",
    "load_grant_key",
    "make_grant",
    "make_keypair",
    "same_host",
    "serve",
]
