"""CurveZMQ on the bus: listed clients get events; anyone else gets nothing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import zmq

from flowbus.bus import ClientCurve, make_keypair
from flowbus.bus import _framing as fr
from flowbus.schemas import BusBroken, CurveConfig, State, decode, decode_many
from support.bus import (
    BusFactory,
    ThreadBroker,
    bus_config,
    bus_fixture,  # noqa: F401 - provides the `bus` fixture
    collect,
    seqs_of,
    state,
)

pytestmark = pytest.mark.timeout(60)


class Keys:
    """Key pairs for the broker (``server``), a listed client (``alice``) and an unlisted one (``mallory``)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "keys"
        self.server_public, self.server_secret = make_keypair(self.dir, "server")
        self.alice_public, self.alice_secret = make_keypair(self.dir, "alice")
        self.mallory_public, self.mallory_secret = make_keypair(self.dir, "mallory")
        self.authorized = root / "authorized"
        self.authorized.mkdir()
        shutil.copy(self.alice_public, self.authorized / "alice.key")  # only alice is admitted

    def server(self) -> CurveConfig:
        return CurveConfig(server_secret_key_file=str(self.server_secret), authorized_keys_dir=str(self.authorized))

    def client(self, secret: Path | None) -> CurveConfig:
        return CurveConfig(server_public_key_file=str(self.server_public),
                           client_secret_key_file=str(secret) if secret else "")

    def curve(self, secret: Path | None) -> ClientCurve:
        curve = ClientCurve.from_config(self.client(secret))
        assert curve is not None
        return curve


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


class TestKeys:
    def test_make_keypair(self, keys: Keys) -> None:
        """make_keypair writes a public key file and a secret key file only the owner may read."""
        assert keys.alice_public.name == "alice.key" and keys.alice_secret.name == "alice.key_secret"
        assert keys.alice_secret.stat().st_mode & 0o077 == 0
        assert b"secret-key" not in keys.alice_public.read_bytes()

    def test_plain_config_means_no_curve(self) -> None:
        """Without key files CURVE stays off and clients get no CURVE settings."""
        assert not CurveConfig().enabled and ClientCurve.from_config(CurveConfig()) is None


class TestCurveBus:
    def start(self, bus: BusFactory, keys: Keys) -> ThreadBroker:
        return bus.broker(bus_config(curve=keys.server()))

    def test_listed_client_gets_events(self, bus: BusFactory, keys: Keys) -> None:
        """A client whose public key is in the authorized directory publishes, subscribes and waits."""
        broker = self.start(bus, keys)
        client = bus.client(broker.address, curve=keys.client(keys.alice_secret))
        assert client.info["curve_server_key"] == keys.curve(None).server_public.decode()
        sub = client.subscribe("qcg/s1/")
        pub = bus.publisher(broker.address, curve=keys.curve(keys.alice_secret))
        pub.open_source("s1", "qcg")
        for i in range(5):
            pub.publish(state("s1", f"j{i}", State.COMPLETE))
        pub.flush(10)
        try:
            assert seqs_of(collect(sub, 5), "s1") == [1, 2, 3, 4, 5]
        finally:
            sub.close()
        assert client.wait("qcg/s1/state/j4 state=complete", timeout=5).seq == 5

    @pytest.mark.parametrize("who", ["mallory", "anonymous", "plaintext"])
    def test_unlisted_client_is_refused(self, bus: BusFactory, keys: Keys, who: str) -> None:
        """A client with an unlisted key, a throwaway key or no CURVE at all cannot even connect."""
        broker = self.start(bus, keys)
        curve = {"mallory": keys.client(keys.mallory_secret), "anonymous": keys.client(None), "plaintext": None}[who]
        with pytest.raises(BusBroken):
            bus.client(broker.address, curve=curve, timeout=0.5)

    @pytest.mark.parametrize("who", ["mallory", "anonymous"])
    def test_unlisted_subscriber_receives_nothing(self, bus: BusFactory, keys: Keys, who: str) -> None:
        """A raw SUB socket with an unlisted key sees no event payload, while a listed one beside it sees them all."""
        broker = self.start(bus, keys)
        publish = broker.endpoints["publish"]
        alice = bus.raw(zmq.SUB, publish, curve=keys.curve(keys.alice_secret), subscribe=b"")
        other = bus.raw(zmq.SUB, publish, curve=keys.curve(keys.mallory_secret if who == "mallory" else None),
                        subscribe=b"")
        # alice's subscription is live once a broker tick reaches her
        assert alice.poll(5000), "the listed subscriber never got a tick"
        alice.recv_multipart()
        pub = bus.publisher(broker.address, curve=keys.curve(keys.alice_secret))
        pub.open_source("s1", "qcg")
        for i in range(20):
            pub.publish(state("s1", f"j{i}"))
        pub.flush(10)
        seen: list[int] = []
        deadline = time.monotonic() + 10
        while len(seen) < 20 and time.monotonic() < deadline and alice.poll(1000):
            frames = alice.recv_multipart()  # [topic, body] or [topic, broker header, body]
            topic, body = frames[0], frames[-1]
            if not topic.startswith(fr.CONTROL):
                seen += [e.seq for e in (decode_many(body) if fr.is_batch(body) else [decode(body)])]
        assert seen == list(range(1, 21))
        # by now the unlisted peer has had every chance: it got neither events nor ticks
        assert other.poll(500) == 0

    def test_plain_subscriber_receives_nothing(self, bus: BusFactory, keys: Keys) -> None:
        """A SUB socket without CURVE cannot read the encrypted publish socket."""
        broker = self.start(bus, keys)
        plain = bus.raw(zmq.SUB, broker.endpoints["publish"], subscribe=b"")
        alice = bus.raw(zmq.SUB, broker.endpoints["publish"], curve=keys.curve(keys.alice_secret), subscribe=b"")
        assert alice.poll(5000)  # a tick reached the listed peer...
        assert plain.poll(500) == 0  # ...and nothing reaches the plaintext one

    def test_unlisted_publisher_is_refused(self, bus: BusFactory, keys: Keys) -> None:
        """A publisher with an unlisted key cannot learn the endpoints, so it publishes nothing."""
        broker = self.start(bus, keys)
        with pytest.raises(BusBroken):
            bus.publisher(broker.address, curve=keys.curve(keys.mallory_secret), timeout=0.5)
        listed = bus.client(broker.address, curve=keys.client(keys.alice_secret))
        assert set(listed.marks()) == {"broker"}

    def test_broker_process_keeps_curve(self, bus: BusFactory, keys: Keys) -> None:
        """A broker started as its own process gets the CURVE settings too: alice in, mallory out."""
        broker = bus.broker_process(bus_config(curve=keys.server()))
        alice = bus.client(broker.address, curve=keys.client(keys.alice_secret))
        assert alice.info["curve_server_key"]
        with pytest.raises(BusBroken):
            bus.client(broker.address, curve=keys.client(keys.mallory_secret), timeout=0.5)
        with pytest.raises(BusBroken):
            bus.client(broker.address, timeout=0.5)
