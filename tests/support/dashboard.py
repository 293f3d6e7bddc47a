"""Fixtures for the dashboard tests: dashboards on a real bus, plain HTTP, and a real Chromium.

``dashboard`` is a factory (style convention 14): every :class:`DashboardServer` it starts is
stopped at the end of the test. ``chromium`` is Debian's chromium driven by Debian's
chromium-driver through Selenium (headless, ``--remote-debugging-pipe``, ``SE_OFFLINE=true`` so
Selenium Manager never tries to download a browser or a driver); the test is skipped, saying
so, where the packages are missing (``bash scripts/dev.sh setup`` installs them).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from flowbus.dashboard import DashboardServer
from flowbus.schemas import DashboardConfig

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: where the browser test keeps its screenshot (CI keeps build/artifacts/)
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "artifacts"


class DashboardFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._made: list[DashboardServer] = []

    def start(self, address: str, *, state: Path | None = None, **config: Any) -> DashboardServer:
        """A started dashboard of the bus at ``address`` on a free loopback port (``port`` to choose)."""
        state = state or self.tmp_path / "state"
        state.mkdir(mode=0o700, exist_ok=True)
        server = DashboardServer(address, state=state, config=DashboardConfig(**{"port": 0, **config}))
        self._made.append(server)
        return server.start()

    def close(self) -> None:
        while self._made:
            self._made.pop().stop()


@pytest.fixture(name="dashboard")
def dashboard_fixture(tmp_path: Path) -> Iterator[DashboardFactory]:
    factory = DashboardFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], str]:
    """One GET, redirects not followed: (status, headers (lower-case names), body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.fixture(name="chromium")
def chromium_fixture() -> Iterator[Any]:
    """A headless Chromium under chromedriver (Selenium), quit at the end of the test."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (bash scripts/dev.sh setup)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="flowbus-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--remote-debugging-pipe", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    service = Service(executable_path=CHROMEDRIVER, port=0)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
