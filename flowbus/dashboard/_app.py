"""The dashboard's web side: a Starlette app behind a token guard, fed by a :class:`Hub`.

Routes (all behind the guard):

- ``/``: the page; ``/static/...``: its own script and style sheet (shipped in the wheel);
- ``/api/events?match=EXPR``: Server-Sent Events, first a ``snapshot`` then ``ops`` as the bus
  carries events, filtered by the match expression (checked by the bus' own parser);
- ``/api/state?match=EXPR``: the same snapshot as JSON, once;
- ``/api/check?match=EXPR``: ``{"ok": true}`` or ``{"error": "..."}`` (400) for the filter box;
- ``/api/logs?session=S&key=K``: a job's output, through the backend's ``logs`` operation.

The guard (:class:`Guard`): the ``Host`` header must name the loopback address the server
listens on (403 otherwise: a web page elsewhere cannot rebind a name of its own to 127.0.0.1 and
read the dashboard); then the owner's token, as ``?token=`` once (answered with a redirect that
sets an HttpOnly, SameSite=Strict cookie for this port), as that cookie, or as
``Authorization: Bearer``; 401 without. Every answer carries a strict Content-Security-Policy
(scripts and styles from the page's own origin only).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowbus.bus import Match
from flowbus.schemas import Event, FlowbusError

from ._model import DashboardModel, Op, visible_ops

log = structlog.get_logger("flowbus.dashboard")

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store")]
#: ops a browser may fall behind by before it is sent a fresh snapshot instead
QUEUE_LIMIT = 2000
KEEPALIVE_S = 15.0


def cookie_name(port: int) -> str:
    """The session cookie of the dashboard on ``port`` (cookies are shared between the ports of a
    host: one name per port keeps two dashboards of two state dirs apart)."""
    return f"flowbus_dashboard_{port}"


def cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"flowbus dashboard cookie", hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware: Host check, token check, security headers (see the module docstring)."""

    def __init__(self, app: ASGIApp, token: str, hosts: set[str], port: int) -> None:
        self.app, self.token, self.hosts, self.port = app, token, hosts, port
        self.cookie = cookie_value(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        request = Request(scope)
        response = self._refusal(request)
        await (response or self.app)(scope, receive, send_secured)

    def _refusal(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        if host not in self.hosts:
            log.warning("dashboard.request.refused", reason="host", host=host[:100])
            return PlainTextResponse(f"flowbus dashboard: Host {host!r} is not this server's own "
                                     f"(use {sorted(self.hosts)[0]})\n", status_code=403)
        given = request.query_params.get("token")
        if given is not None:
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return _unauthorized("the token in the URL is not this dashboard's")
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            # one leading slash: "//host" would send the browser to another site
            target = "/" + request.url.path.lstrip("/") + ("?" + urlencode(rest) if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(cookie_name(self.port), self.cookie, httponly=True, samesite="strict", path="/")
            return response
        cookie = request.cookies.get(cookie_name(self.port), "")
        if cookie and hmac.compare_digest(cookie.encode(), self.cookie.encode()):
            return None
        bearer = request.headers.get("authorization", "")
        if bearer and hmac.compare_digest(bearer.encode(), f"Bearer {self.token}".encode()):
            return None
        return _unauthorized("a token is required")


def _unauthorized(why: str) -> Response:
    log.warning("dashboard.request.refused", reason=why)
    return PlainTextResponse(f"flowbus dashboard: {why}; open the URL `flowbus dashboard` prints "
                             "(its token is in the state dir's dashboard.token)\n", status_code=401,
                             headers={"WWW-Authenticate": "Bearer"})


class _Conn:
    """One browser's event stream: a bounded queue on the event loop, with its filter."""

    def __init__(self, match: Match | None, loop: asyncio.AbstractEventLoop) -> None:
        self.match, self.loop = match, loop
        self.queue: asyncio.Queue[list[Op] | None] = asyncio.Queue()
        self.behind = False

    def put(self, ops: list[Op] | None) -> None:  # on the loop's thread
        if ops is not None and self.queue.qsize() >= QUEUE_LIMIT:
            self.behind = True  # too slow: a fresh snapshot replaces what it missed
            return
        self.queue.put_nowait(ops)


class TooManyClients(FlowbusError):
    """Every one of the dashboard's ``max-clients`` streams is taken."""


class Hub:
    """The model, its lock, and the browsers' streams. The feeder thread calls :meth:`feed`; the
    event loop attaches and detaches streams."""

    def __init__(self, model: DashboardModel, max_clients: int) -> None:
        self.model, self.max_clients = model, max_clients
        self.lock = threading.Lock()
        self._conns: list[_Conn] = []
        self.closed = False
        self.known_sessions: set[str] = set()

    def feed(self, events: list[Event]) -> None:
        with self.lock:
            ops = self.model.apply_many(events)
            for conn in self._conns:
                mine = visible_ops(ops, conn.match)
                if mine:
                    try:
                        conn.loop.call_soon_threadsafe(conn.put, mine)
                    except RuntimeError:
                        pass  # its event loop is closed: the server is stopping

    def attach(self, match: Match | None) -> tuple[_Conn, Op]:
        with self.lock:
            if len(self._conns) >= self.max_clients:
                raise TooManyClients(f"the dashboard serves at most {self.max_clients} browsers at once "
                                     "([dashboard] max-clients)")
            conn = _Conn(match, asyncio.get_running_loop())
            self._conns.append(conn)
            return conn, self.model.snapshot(match)

    def resnapshot(self, conn: _Conn) -> Op:
        with self.lock:
            while not conn.queue.empty():
                conn.queue.get_nowait()
            conn.behind = False
            return self.model.snapshot(conn.match)

    def detach(self, conn: _Conn) -> None:
        with self.lock:
            if conn in self._conns:
                self._conns.remove(conn)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for conn in self._conns:
                try:
                    conn.loop.call_soon_threadsafe(conn.put, None)
                except RuntimeError:
                    pass  # its event loop is closed already

    def sessions(self) -> set[str]:
        """The session names a filter may name: the running config's, and every one seen."""
        with self.lock:
            return self.known_sessions | set(self.model.sessions())

    def clients(self) -> int:
        with self.lock:
            return len(self._conns)


def parse_match(text: str | None, sessions: set[str]) -> Match | None:
    """The filter box's expression, checked as ``flowbus wait`` checks it (a bare prefix such as
    ``qcg/`` covers everything below it, as in ``flowbus watch``); ``None`` for an empty one."""
    text = (text or "").strip()
    if not text:
        return None
    head, *conds = text.split()
    if "=" not in head and (head.endswith("/") or not (conds or any(ch in head for ch in "*?["))):
        head += "*"  # a plain prefix, or a glob ending in '/': everything below it
    m = Match(" ".join([head, *conds]))
    if sessions:
        m.check_names(sessions)
    return m


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


LogsCaller = Callable[[str, str], Any]


def make_app(hub: Hub, *, token: str, hosts: set[str], port: int, logs: LogsCaller) -> ASGIApp:
    """The guarded ASGI app of one dashboard."""

    def _match(request: Request) -> Match | None:
        return parse_match(request.query_params.get("match"), hub.sessions())

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def check(request: Request) -> Response:
        try:
            _match(request)
        except FlowbusError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True})

    async def state(request: Request) -> Response:
        try:
            match = _match(request)
        except FlowbusError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        with hub.lock:
            return JSONResponse(hub.model.snapshot(match))

    async def events(request: Request) -> Response:
        try:
            conn, snap = hub.attach(_match(request))
        except TooManyClients as exc:
            return PlainTextResponse(f"flowbus dashboard: {exc}\n", status_code=503)
        except FlowbusError as exc:
            return PlainTextResponse(f"flowbus dashboard: {exc}\n", status_code=400)

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 1000\n\n" + _sse("snapshot", snap)
                while not hub.closed:
                    try:
                        first = await asyncio.wait_for(conn.queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if first is None:
                        return
                    ops = list(first)
                    while not conn.queue.empty():  # what else is there: one message
                        more = conn.queue.get_nowait()
                        if more is None:
                            return
                        ops += more
                    if conn.behind:
                        yield _sse("snapshot", hub.resnapshot(conn))
                    else:
                        yield _sse("ops", ops)
            finally:
                hub.detach(conn)

        from starlette.responses import StreamingResponse

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    async def job_logs(request: Request) -> Response:
        session, key = request.query_params.get("session", ""), request.query_params.get("key", "")
        if not session:
            return JSONResponse({"error": "no session given"}, status_code=400)
        try:
            result = await asyncio.to_thread(logs, session, key)
        except FlowbusError as exc:
            return JSONResponse({"key": key, "error": str(exc)})
        problem = logs_problem(result)
        if problem:
            return JSONResponse({"key": key, "error": problem})
        return JSONResponse(result)

    app = Starlette(routes=[
        Route("/", index),
        Route("/api/check", check),
        Route("/api/state", state),
        Route("/api/events", events),
        Route("/api/logs", job_logs),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    return Guard(app, token, hosts, port)


def logs_problem(result: Any) -> str:
    """Why an answer of a backend's ``logs`` is not one the page can show ('' when it is):
    ``{"key", "parts": [{"name", "path", "text", "truncated"}], "reason"?}``."""
    if not isinstance(result, dict) or not isinstance(result.get("parts"), list):
        return f"unexpected answer of logs: {str(result)[:200]}"
    if not result["parts"]:
        return str(result.get("reason") or "the backend keeps no output for it")
    for part in result["parts"]:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            return f"unexpected part in the answer of logs: {str(part)[:200]}"
    return ""


__all__ = ["CSP", "Guard", "Hub", "TooManyClients", "cookie_name", "logs_problem", "make_app", "parse_match"]
