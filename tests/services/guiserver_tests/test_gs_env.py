"""guiserver_env_defaults: the DiFX interface's DIFX_CONTROL_* / DIFX_MESSAGE_PORT defaults, pure."""

from __future__ import annotations

import msgspec
import pytest

from flowbus.schemas import ConfigError, GuiserverSessionConfig
from flowbus.schemas._env import guiserver_env_defaults


@pytest.mark.timeout(10)
class TestEnvDefaults:
    """Which config keys the environment supplies, and with what precedence."""

    def test_empty_environment(self) -> None:
        """No variable set: nothing supplied (the config's own defaults stay)."""
        assert guiserver_env_defaults({}) == {}
        assert guiserver_env_defaults({"PATH": "/bin", "DIFX_BASE": "/opt/difx"}) == {}

    def test_host_and_control_port(self) -> None:
        """DIFX_CONTROL_HOST gives host, DIFX_CONTROL_PORT gives an int port."""
        env = {"DIFX_CONTROL_HOST": "127.0.0.1", "DIFX_CONTROL_PORT": "50401"}
        assert guiserver_env_defaults(env) == {"host": "127.0.0.1", "port": 50401}

    def test_control_port_wins_over_message_port(self) -> None:
        """DIFX_CONTROL_PORT takes precedence; DIFX_MESSAGE_PORT is then not even validated."""
        assert guiserver_env_defaults({"DIFX_CONTROL_PORT": "50300", "DIFX_MESSAGE_PORT": "50200"}) == {"port": 50300}
        assert guiserver_env_defaults({"DIFX_CONTROL_PORT": "50300", "DIFX_MESSAGE_PORT": "junk"}) == {"port": 50300}

    def test_message_port_fallback(self) -> None:
        """Without DIFX_CONTROL_PORT, DIFX_MESSAGE_PORT names the port (it sets the server's TCP port)."""
        assert guiserver_env_defaults({"DIFX_MESSAGE_PORT": "50201"}) == {"port": 50201}

    def test_empty_values_are_unset(self) -> None:
        """An empty or blank variable supplies nothing and falls through to the next one."""
        assert guiserver_env_defaults({"DIFX_CONTROL_HOST": "", "DIFX_CONTROL_PORT": "  "}) == {}
        assert guiserver_env_defaults({"DIFX_CONTROL_PORT": "", "DIFX_MESSAGE_PORT": "50202"}) == {"port": 50202}

    def test_blanks_stripped(self) -> None:
        """Surrounding blanks are ignored."""
        assert guiserver_env_defaults({"DIFX_CONTROL_HOST": " localhost\n", "DIFX_CONTROL_PORT": " 7 "}) == {
            "host": "localhost", "port": 7}

    def test_keys_are_valid_config(self) -> None:
        """The result merges into a [[sessions]] table that GuiserverSessionConfig accepts."""
        got = guiserver_env_defaults({"DIFX_CONTROL_HOST": "localhost", "DIFX_MESSAGE_PORT": "50210"})
        cfg = msgspec.convert({"name": "difx", **got}, GuiserverSessionConfig)
        assert (cfg.host, cfg.port) == ("localhost", 50210)


@pytest.mark.timeout(10)
class TestEnvErrors:
    """A bad value is a ConfigError naming the variable."""

    @pytest.mark.parametrize("value", ["fifty", "50200.0", "0x50", "5 0", "½"])
    @pytest.mark.parametrize("var", ["DIFX_CONTROL_PORT", "DIFX_MESSAGE_PORT"])
    def test_non_integer_port(self, var: str, value: str) -> None:
        """A port that is not a decimal integer."""
        with pytest.raises(ConfigError, match=rf"{var}=.*must be an integer"):
            guiserver_env_defaults({var: value})

    @pytest.mark.parametrize("value", ["0", "-1", "65536", "99999999999"])
    @pytest.mark.parametrize("var", ["DIFX_CONTROL_PORT", "DIFX_MESSAGE_PORT"])
    def test_port_out_of_range(self, var: str, value: str) -> None:
        """A port outside 1..65535."""
        with pytest.raises(ConfigError, match=rf"{var}=.*out of range"):
            guiserver_env_defaults({var: value})

    def test_bad_control_port_not_masked_by_message_port(self) -> None:
        """A set but bad DIFX_CONTROL_PORT is an error even when DIFX_MESSAGE_PORT is fine."""
        with pytest.raises(ConfigError, match="DIFX_CONTROL_PORT"):
            guiserver_env_defaults({"DIFX_CONTROL_PORT": "x", "DIFX_MESSAGE_PORT": "50200"})

    @pytest.mark.parametrize("value", ["local host", "host\x00", "a\tb"])
    def test_bad_host(self, value: str) -> None:
        """A host with inner blanks or control characters."""
        with pytest.raises(ConfigError, match="DIFX_CONTROL_HOST"):
            guiserver_env_defaults({"DIFX_CONTROL_HOST": value})
