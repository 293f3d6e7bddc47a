"""Configuration loading: typed, strict, and one clear line naming the key and the file on error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from flowbus.bus import Broker
from flowbus.schemas import (
    BusConfig,
    ConfigError,
    CurveConfig,
    FlowbusConfig,
    QcgSessionConfig,
    embedded_default,
    is_loopback,
    load_config,
    parse_config,
)

ORIGIN = "/etc/flowbus/site.toml"


def refused(data: dict[str, Any]) -> str:
    """The message of the ConfigError that parse_config raises for ``data``."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, ORIGIN)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith(f"{ORIGIN}: "), message
    return message


class TestParseConfig:
    def test_empty_is_all_defaults(self) -> None:
        """An empty mapping gives the defaults: a loopback broker and no sessions."""
        cfg = parse_config({}, ORIGIN)
        assert cfg == FlowbusConfig()
        assert cfg.bus.host == "127.0.0.1" and cfg.sessions == []

    def test_kebab_case_keys(self) -> None:
        """Keys are kebab-case, as in the Helm values, and land in the typed fields."""
        cfg = parse_config({
            "bus": {"request-port": 9000, "journal-events": 10, "curve": {"server-secret-key-file": "/k"}},
            "sessions": [{"backend": "qcg", "name": "hpc", "mode": "connect", "address": "tcp://h:1",
                          "recovery-attempts": 2}],
        }, ORIGIN)
        assert cfg.bus.request_port == 9000 and cfg.bus.journal_events == 10
        assert cfg.bus.curve.server_secret_key_file == "/k" and cfg.bus.curve.enabled
        assert cfg.sessions == [QcgSessionConfig(name="hpc", mode="connect", address="tcp://h:1",
                                                 recovery_attempts=2)]

    def test_session_needs_a_backend(self) -> None:
        """A session without ``backend`` is refused with the kinds there are."""
        assert refused({"sessions": [{"name": "a"}]}) == (
            f"{ORIGIN}: sessions[0]: missing key 'backend' (one of: qcg, guiserver, ecflow, soma, wms)")
        assert parse_config({"sessions": [{"backend": "qcg", "name": "a"}]}, ORIGIN).sessions == [
            QcgSessionConfig(name="a")]

    @pytest.mark.parametrize(("data", "names"), [
        ({"bogus": 1}, ["unknown key", "'bogus'"]),
        ({"bus": {"hots": "x"}}, ["unknown key", "'bus.hots'"]),
        ({"bus": {"request_port": 5}}, ["unknown key", "'bus.request_port'"]),
        ({"bus": {"curve": {"nope": 1}}}, ["unknown key", "'bus.curve.nope'"]),
        ({"sessions": [{"backend": "qcg", "name": "a", "nodez": "n1:2"}]}, ["unknown key", "'sessions[0].nodez'"]),
    ], ids=["top", "bus", "snake-case", "curve", "session"])
    def test_unknown_key(self, data: dict[str, Any], names: list[str]) -> None:
        """An unknown key is an error naming the key's full path and the file."""
        message = refused(data)
        for name in names:
            assert name in message

    @pytest.mark.parametrize(("data", "key", "detail"), [
        ({"bus": {"request-port": "x"}}, "bus.request-port", "Expected `int`, got `str`"),
        ({"bus": {"heartbeat-interval": "fast"}}, "bus.heartbeat-interval", "Expected `float`"),
        ({"log": {"json": "yes"}}, "log.json", "Expected `bool`"),
        ({"bus": 5}, "bus", "Expected `object`"),
        ({"sessions": {"a": 1}}, "sessions", "Expected `array`"),
        ({"sessions": [{"backend": "qcg", "name": "a", "mode": "remote"}]}, "sessions[0].mode", "remote"),
        ({"sessions": [{"backend": "slurm", "name": "a"}]}, "sessions[0].backend", "slurm"),
        ({"sessions": [{"backend": "qcg"}]}, "sessions[0]", "`name`"),
    ], ids=["port-str", "interval-str", "bool", "table", "array", "enum", "backend", "missing"])
    def test_wrong_type(self, data: dict[str, Any], key: str, detail: str) -> None:
        """A value of the wrong type is an error naming the key, the file and what was expected."""
        message = refused(data)
        assert f"{ORIGIN}: {key}: " in message
        assert detail in message

    def test_duplicate_session_names(self) -> None:
        """Two sessions with one name are refused, naming the name."""
        message = refused({"sessions": [{"backend": "qcg", "name": "a"}, {"backend": "qcg", "name": "b"}, {"backend": "qcg", "name": "a"}]})
        assert "sessions" in message and "duplicate session name 'a'" in message

    @pytest.mark.parametrize("name", ["", "a/b"])
    def test_bad_session_name(self, name: str) -> None:
        """A session name must be non-empty and free of '/', since it is a topic segment."""
        assert "sessions[0].name" in refused({"sessions": [{"backend": "qcg", "name": name}]})

    def test_connect_needs_address(self) -> None:
        """A ``connect`` session without an address is refused, naming the key."""
        assert "sessions[0].address" in refused({"sessions": [{"backend": "qcg", "name": "a", "mode": "connect"}]})

    @pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.org", "*", "127.0.0.1.nip.io"])
    def test_non_loopback_needs_curve(self, host: str) -> None:
        """Binding anywhere but loopback without a CURVE server key is refused, naming both keys."""
        message = refused({"bus": {"host": host}})
        assert "bus.host" in message and "bus.curve.server-secret-key-file" in message

    def test_non_loopback_client_with_public_key(self) -> None:
        """A client's config (the broker's public key only) may name a remote broker host; the
        broker itself refuses to bind such a host without its secret key."""
        cfg = parse_config({"bus": {"host": "broker.ops.svc", "curve": {"server-public-key-file": "/srv.key"}}}, ORIGIN)
        assert cfg.bus.host == "broker.ops.svc"
        from flowbus.bus import Broker

        broker = Broker(cfg.bus.__class__(transport="tcp", host="0.0.0.0", request_port=0, publish_port=0, ingest_port=0))
        with pytest.raises(OSError, match=r"not loopback.*server-secret-key-file"):
            broker.bind()

    def test_non_loopback_with_curve(self) -> None:
        """With a CURVE server secret key a non-loopback host is accepted."""
        cfg = parse_config({"bus": {"host": "0.0.0.0", "curve": {"server-secret-key-file": "/s"}}}, ORIGIN)
        assert cfg.bus.host == "0.0.0.0"

    @pytest.mark.parametrize(("key", "value"), [("request-port", 70000), ("ingest-port", -1),
                                                ("heartbeat-interval", 0), ("heartbeat-interval", -0.5),
                                                ("journal-fsync-interval", 0), ("journal-fsync-interval", -1)])
    def test_out_of_range(self, key: str, value: float) -> None:
        """Ports outside 0..65535 and non-positive heartbeat or fsync intervals are refused, naming the key."""
        assert f"bus.{key}" in refused({"bus": {key: value}})

    @pytest.mark.parametrize("key", ["sessions-per-actor", "poll-workers", "open-concurrency"])
    def test_actor_sizes_are_positive(self, key: str) -> None:
        """An actor needs at least one session slot, poll worker and opener; 0 is refused by name."""
        assert f"ray.{key}: must be >= 1" in refused({"ray": {key: 0}})


class TestLoadConfig:
    def test_file(self, tmp_path: Path) -> None:
        """A TOML file loads into the typed configuration."""
        path = tmp_path / "flowbus.toml"
        path.write_text('[bus]\nrequest-port = 9100\n\n[[sessions]]\nbackend = "qcg"\nname = "local"\n')
        cfg = load_config(path)
        assert cfg.bus.request_port == 9100 and [s.name for s in cfg.sessions] == ["local"]

    def test_none_is_the_embedded_default(self) -> None:
        """No file means the embedded default: one local QCG session on a loopback broker."""
        cfg = load_config(None)
        assert cfg == embedded_default()
        assert [(s.name, cast(QcgSessionConfig, s).mode) for s in cfg.sessions] == [("local", "local")]

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is one line naming the file."""
        path = tmp_path / "nope.toml"
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: no such config file"

    def test_bad_toml(self, tmp_path: Path) -> None:
        """Broken TOML is one line naming the file and the position."""
        path = tmp_path / "broken.toml"
        path.write_text("[bus]\nrequest-port = = 3\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        message = str(info.value)
        assert message.startswith(f"{path}: not valid TOML") and "line 2" in message and "\n" not in message

    @pytest.mark.parametrize(("text", "key"), [
        ("[bus]\nhots = 'x'\n", "'bus.hots'"),
        ("[bus]\nrequest-port = 'x'\n", "bus.request-port"),
        ("[[sessions]]\nbackend = 'qcg'\nname = 'a'\n[[sessions]]\nbackend = 'qcg'\nname = 'a'\n", "duplicate session name 'a'"),
        ("[bus]\nhost = '0.0.0.0'\n", "bus.host"),
    ], ids=["unknown-key", "wrong-type", "duplicate", "non-loopback"])
    def test_errors_name_the_file(self, tmp_path: Path, text: str, key: str) -> None:
        """Validation errors from a file name that file and the key."""
        path = tmp_path / "site.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and key in message and "\n" not in message

    @pytest.mark.timeout(30)
    def test_cli_prints_one_line(self, tmp_path: Path) -> None:
        """``flowbus broker --config`` with a bad key exits 1 and prints one line naming key and file."""
        path = tmp_path / "site.toml"
        path.write_text("[bus]\nrequest-port = 9100\nhots = 'x'\n")
        proc = subprocess.run([sys.executable, "-m", "flowbus", "broker", "--config", str(path)], check=False,
                              capture_output=True, text=True, timeout=25)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert lines == [f"flowbus: error: {path}: unknown key 'bus.hots'"]


class TestConfigTypes:
    @pytest.mark.parametrize(("host", "loopback"), [
        ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
        ("0.0.0.0", False), ("128.0.0.1", False), ("127.0.0.1.evil.org", False), ("", False),
    ])
    def test_is_loopback(self, host: str, loopback: bool) -> None:
        """Only 127.0.0.0/8, localhost and ::1 count as loopback."""
        assert is_loopback(host) is loopback

    def test_config_structs_refuse_unknown_fields(self) -> None:
        """Config structs are strict (unknown fields are errors), unlike wire events."""
        for cls in (BusConfig, CurveConfig, FlowbusConfig, QcgSessionConfig):
            assert cls.__struct_config__.forbid_unknown_fields

    def test_json_round_trip(self) -> None:
        """A config survives the JSON hop the broker process gets its settings through."""
        cfg = BusConfig(request_port=1, journal_events=5, curve=CurveConfig(server_secret_key_file="/x"))
        assert msgspec.json.decode(msgspec.json.encode(cfg), type=BusConfig) == cfg

    def test_missing_curve_key_file_names_the_key(self, tmp_path: Path) -> None:
        """A broker whose CURVE key file is missing fails with one line naming the config key."""
        cfg = BusConfig(transport="tcp", request_port=0, publish_port=0, ingest_port=0,
                        curve=CurveConfig(server_secret_key_file=str(tmp_path / "absent.key_secret")))
        broker = Broker(cfg)
        with pytest.raises(ConfigError) as info:
            broker.bind()
        broker.close()
        assert str(info.value).startswith("bus.curve.server-secret-key-file: cannot read key file")
        assert "absent.key_secret" in str(info.value)
