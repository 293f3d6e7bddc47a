"""ZeroMQ transport: broker, publisher, subscriber, journal/replay, waits and callbacks."""

from ._broker import BROKER_SOURCE, Broker
from ._client import DEFAULT_ADDRESS, Callback, Client, Expectation
from ._curve import ClientCurve, make_keypair
from ._journal import Journal
from ._match import Match, as_match
from ._process import BrokerProcess, serve
from ._publisher import Publisher
from ._subscriber import Subscriber

__all__ = [
    "BROKER_SOURCE",
    "DEFAULT_ADDRESS",
    "Broker",
    "BrokerProcess",
    "Callback",
    "Client",
    "ClientCurve",
    "Expectation",
    "Journal",
    "Match",
    "Publisher",
    "Subscriber",
    "as_match",
    "make_keypair",
    "serve",
]
