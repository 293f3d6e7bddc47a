"""The ``[dashboard]`` table of the config file."""

from __future__ import annotations

import re

import pytest

from flowbus.schemas import ConfigError, DashboardConfig, parse_config


class TestDashboardConfig:
    def test_the_default_serves_on_loopback_port_7780(self) -> None:
        """Without a table, flowbus up serves the dashboard on 127.0.0.1:7780."""
        cfg = parse_config({})
        assert cfg.dashboard == DashboardConfig() and (cfg.dashboard.host, cfg.dashboard.port) == ("127.0.0.1", 7780)

    def test_keys_are_kebab_case_and_checked(self) -> None:
        """Values are read in kebab case; a bad one is refused naming the key."""
        cfg = parse_config({"dashboard": {"port": -1, "hours": 2, "max-resources": 10, "max-clients": 2}})
        assert (cfg.dashboard.port, cfg.dashboard.hours, cfg.dashboard.max_resources) == (-1, 2.0, 10)
        for table, needle in [({"port": 70000}, "dashboard.port: 70000 is not a port"),
                              ({"hours": 0}, "dashboard.hours: 0.0 must be more than 0"),
                              ({"max-timeline": 0}, "dashboard.max-timeline: 0 must be at least 1"),
                              ({"host": "0.0.0.0"}, "dashboard.host: '0.0.0.0' is not a loopback address"),
                              ({"prot": 1}, "unknown key 'dashboard.prot'")]:
            with pytest.raises(ConfigError, match=re.escape(needle)):
                parse_config({"dashboard": table}, origin="f.toml")
