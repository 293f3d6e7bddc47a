"""The dashboard server: uvicorn on loopback in a thread, fed by a bus subscriber in another.

``DashboardServer(address, curve=..., state=..., config=...).start()`` binds the port at once
(so the URL is known and a browser's connection waits in the backlog until the app serves),
subscribes to the whole bus from a snapshot, and serves until :meth:`stop`. A job's log is asked
for through the bus' command path (``Client.call(session, "logs", [key], {"max_bytes": 65536})``),
so the dashboard of ``flowbus up`` and a ``flowbus dashboard --serve`` beside it work alike.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

import structlog

from flowbus.schemas import BusError, DashboardConfig, FlowbusError

from ._app import Hub, make_app
from ._model import DashboardModel

log = structlog.get_logger("flowbus.dashboard")

TOKEN_FILE = "dashboard.token"  # noqa: S105 - the name of the file, not a secret
DEFAULT_PORT = DashboardConfig().port
#: what one log request may bring back (the backend cuts each part to this)
LOG_BYTES = 65536


def dashboard_token(state: Path) -> str:
    """The owner's dashboard token (made on first use, 0600 in the private state dir)."""
    path = state / TOKEN_FILE
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made meanwhile by another process of ours
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; the default port, when taken, gives way to a free one."""
    for attempt in (port, 0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, attempt))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and attempt == DEFAULT_PORT:
                log.info("dashboard.port.taken", port=attempt)
                continue
            raise FlowbusError(f"dashboard: cannot listen on {host}:{attempt}: {exc.strerror or exc}") from None
        sock.listen(128)
        return sock
    raise AssertionError("unreachable: port 0 always binds or raises")


class DashboardServer:
    """The live web dashboard of one bus (see the module docstring)."""

    def __init__(self, address: str, *, state: Path, config: DashboardConfig | None = None,
                 curve: Any = None) -> None:
        self.config = config or DashboardConfig()
        self.address, self.curve, self.state = address, curve, state
        self.token = dashboard_token(state)
        self.token_file = str(state / TOKEN_FILE)
        self.hub = Hub(DashboardModel(hours=self.config.hours, max_resources=self.config.max_resources,
                                      max_timeline=self.config.max_timeline), self.config.max_clients)
        self._sock = bind(self.config.host, self.config.port)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://{self.config.host}:{self.port}/"
        hosts = {f"{self.config.host}:{self.port}"}
        if self.config.host == "127.0.0.1":
            hosts.add(f"localhost:{self.port}")
        self._app = make_app(self.hub, token=self.token, hosts=hosts, port=self.port, logs=self._logs)
        self._stop = threading.Event()
        self._calls_lock = threading.Lock()
        self._caller: Any = None
        self._server: Any = None
        self._threads: list[threading.Thread] = []
        self.feed_error: BaseException | None = None
        self._fed = threading.Event()

    @property
    def login_url(self) -> str:
        """The URL with the token: opening it once sets the session cookie."""
        return f"{self.url}?token={self.token}"

    def start(self, ready_timeout: float = 30.0) -> DashboardServer:
        """Start feeding and serving; returns once the bus snapshot is in the model (or the
        subscriber failed, which is raised)."""
        import uvicorn

        cfg = uvicorn.Config(self._app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                             ws="none", http="h11", timeout_graceful_shutdown=2, timeout_keep_alive=5)
        self._server = uvicorn.Server(cfg)
        feeder = threading.Thread(target=self._feed, name="flowbus-dashboard-feed", daemon=True)
        web = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                               name="flowbus-dashboard-web", daemon=True)
        asker = threading.Thread(target=self._ask_sessions, name="flowbus-dashboard-sessions", daemon=True)
        self._threads = [feeder, web, asker]
        feeder.start()
        asker.start()
        if not self._fed.wait(ready_timeout):
            self.stop()
            raise FlowbusError(f"dashboard: no snapshot from the bus at {self.address} within {ready_timeout:g} s")
        if self.feed_error is not None:
            self.stop()
            raise FlowbusError(f"dashboard: cannot subscribe to the bus at {self.address}: {self.feed_error}")
        web.start()
        log.info("dashboard.serving", url=self.url, token_file=self.token_file)
        return self

    def _feed(self) -> None:
        from flowbus.bus import Client

        try:
            client = Client(self.address, curve=self.curve)
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.feed_error = exc
            self._fed.set()
            return
        try:
            with client.subscribe("", start="snapshot") as sub:
                self.hub.feed(sub.recv_many(0))
                self._fed.set()
                while not self._stop.is_set():
                    events = sub.recv_many(0.2)
                    if events:
                        self.hub.feed(events)
        except BusError as exc:
            self.feed_error = exc
            log.error("dashboard.feed.failed", error=str(exc))
        except BaseException as exc:  # noqa: BLE001 - a feeder that dies says why, the web side keeps serving
            self.feed_error = exc
            log.error("dashboard.feed.failed", error=repr(exc))
        finally:
            self._fed.set()
            client.close()

    def _ask_sessions(self) -> None:
        """The running config's session names, for the filter's did-you-mean (asked once, beside
        the feed: with no ``flowbus up`` serving commands the answer takes a few seconds)."""
        from flowbus.bus import Client

        try:
            with Client(self.address, curve=self.curve) as client:
                names = client.command("sessions", timeout=5.0)
        except FlowbusError as exc:
            log.info("dashboard.sessions.unknown", error=str(exc))  # the filter checks the sessions it sees
            return
        if isinstance(names, dict):
            with self.hub.lock:
                self.hub.known_sessions = {str(k) for k in names}

    def _logs(self, session: str, key: str) -> Any:
        """The backend's ``logs`` of ``key``, through the bus' command path (one call at a time)."""
        from flowbus.bus import Client

        with self._calls_lock:
            if self._caller is None:
                self._caller = Client(self.address, curve=self.curve)
            return self._caller.call(session, "logs", [key], {"max_bytes": LOG_BYTES}, timeout=30.0)

    def stop(self) -> None:
        self._stop.set()
        self.hub.close()
        if self._server is not None:
            self._server.should_exit = True
        for t in self._threads:
            if t.is_alive():
                t.join(10)
        self._sock.close()
        with self._calls_lock:
            if self._caller is not None:
                self._caller.close()
                self._caller = None

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["DEFAULT_PORT", "TOKEN_FILE", "DashboardServer", "bind", "dashboard_token"]
