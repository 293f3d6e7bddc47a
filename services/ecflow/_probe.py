"""ecFlow's wire on a socket of our own, and the liveness verdicts built on it: a request sent
this way costs the session only a wait in ``recv`` with the GIL released, never a blocking
``ecflow.Client`` call that holds the GIL of the whole process, so a server that stops answering
(SIGSTOP, a hung VM, a relay that accepts and never replies) stalls nobody else.

The wire (ecFlow 5.x, cereal JSON): every message is an 8-character header, the payload length
in hexadecimal right-aligned with spaces, then the payload. A request is a
``ClientToServerRequest`` holding a user command (:func:`cts_request`), e.g. a ``CtsCmd`` with
``api_`` 8 (PING, :func:`ping_request`) or the poll's NEWS (:mod:`._news`); the server answers
with a ``ServerToClientResponse`` and closes the connection.

Sans-I/O part: :func:`cts_request`, :func:`ping_request` and :class:`ReplyReader`; I/O part:
:func:`exchange` (one connection, one deadline for connect, send and reply) and :func:`probe`
(a ping). :class:`Liveness` turns the answers into the session's verdicts: ``answered``,
``stuck`` (no answer within ``probe-timeout``; the session then makes no client call), then lost
(``BackendTimeout``) at its :attr:`Liveness.deadline`.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from flowbus.schemas import BackendError, BackendProtocolError, BackendTimeout, BackendUnavailable

#: the header: payload length in hex, right-aligned in 8 characters
HEADER_LEN = 8
#: ecFlow's CtsCmd api number of PING
_PING_API = 8
#: the largest reply accepted (a ping's or NEWS's is about 240 bytes, an empty zombie list's 250)
MAX_REPLY = 64 * 1024
#: cereal's id of the first polymorphic pointer in an archive
_FIRST_PTR = 2147483649


def frame(payload: bytes) -> bytes:
    """``payload`` with ecFlow's 8-character hex length header."""
    return f"{len(payload):8x}".encode("ascii") + payload


def cts_request(class_name: str, user: str, host: str, fields: dict[str, Any]) -> bytes:
    """The framed bytes of a ``ClientToServerRequest`` holding the user command ``class_name``
    (its ``UserCmd`` base: ``user`` on ``host``) with ``fields`` after the base."""
    cmd = {"cereal_class_version": 0,
           "value0": {"cereal_class_version": 0,
                      "value0": {"cereal_class_version": 0, "cl_host_": host},
                      "user_": user},
           **fields}
    body = {"21ClientToServerRequest": {"cmd_": {"polymorphic_id": _FIRST_PTR, "polymorphic_name": class_name,
                                                 "ptr_wrapper": {"id": _FIRST_PTR, "data": cmd}}}}
    return frame(json.dumps(body, indent=0).encode("utf-8"))


def ping_request(user: str, host: str) -> bytes:
    """The framed bytes of ecFlow's PING request from ``user`` on ``host``."""
    return cts_request("CtsCmd", user, host, {"api_": _PING_API})


class ReplyReader:
    """Feed it what the socket gave; :attr:`reply` is the decoded reply once complete."""

    def __init__(self) -> None:
        self._buf = b""
        self.reply: dict[str, Any] | None = None

    def feed(self, data: bytes) -> bool:
        """Add bytes; True once a whole reply was read. Raises ``BackendProtocolError`` for a
        header that is not a length, a reply too big, or a payload that is not an ecFlow reply."""
        self._buf += data
        if len(self._buf) < HEADER_LEN:
            return False
        head = self._buf[:HEADER_LEN]
        try:
            size = int(head.decode("ascii").strip(), 16)
        except (UnicodeDecodeError, ValueError):
            raise BackendProtocolError(f"ecFlow reply header {head!r} is not a hex length") from None
        if size > MAX_REPLY:
            raise BackendProtocolError(f"ecFlow reply of {size} bytes exceeds {MAX_REPLY}")
        if len(self._buf) < HEADER_LEN + size:
            return False
        try:
            reply = json.loads(self._buf[HEADER_LEN:HEADER_LEN + size])
        except ValueError as exc:
            raise BackendProtocolError(f"ecFlow reply is not JSON: {exc}") from None
        if not isinstance(reply, dict) or not any("ServerToClientResponse" in k for k in reply):
            raise BackendProtocolError(f"ecFlow reply: not an ecFlow reply: {str(reply)[:120]!r}")
        self.reply = reply
        return True


def exchange(host: str, port: int, request: bytes, timeout: float, what: str = "ping") -> tuple[dict[str, Any], float]:
    """Send one framed request on a socket of our own (the server closes it after replying); the
    decoded reply and the seconds it took. Raises ``BackendUnavailable`` (refused, reset: nobody
    listens), ``BackendTimeout`` (no whole reply within ``timeout`` seconds: the server is stuck)
    or ``BackendProtocolError``; ``what`` names the request in the messages."""
    started = time.monotonic()
    deadline = started + timeout
    reader = ReplyReader()
    try:
        with socket.create_connection((host, port), timeout=max(0.001, timeout)) as sock:
            sock.sendall(request)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    raise BackendUnavailable(f"ecFlow {what}: {host}:{port} closed the connection without a reply")
                if reader.feed(data):
                    assert reader.reply is not None
                    return reader.reply, time.monotonic() - started
    except TimeoutError:
        raise BackendTimeout(f"ecFlow server {host}:{port} did not answer a {what} within {timeout:g} s "
                             "(stuck)") from None
    except BackendProtocolError as exc:
        raise BackendProtocolError(f"{exc} (from {host}:{port})") from None
    except OSError as exc:
        raise BackendUnavailable(f"ecFlow {what}: {host}:{port}: {exc}") from exc


def probe(host: str, port: int, timeout: float, *, user: str = "flowbus", client_host: str = "") -> float:
    """Ping the server once on a socket of our own; the seconds it took to answer (errors as
    :func:`exchange`)."""
    request = ping_request(user, client_host or socket.gethostname())
    return exchange(host, port, request, timeout)[1]


class Liveness:
    """The session's view of whether its server answers, from probes (see module docstring).

    :meth:`check` pings once (:meth:`ask` sends any request the same way): True when the
    server answered, False while it is stuck (it did not answer within ``probe_timeout``; the
    session makes no client call then), and raises ``BackendTimeout`` once past
    :attr:`deadline` (``stuck`` then ``Disconnected`` within ``request-timeout + probe-timeout
    + poll-interval`` of the freeze while polls run at most ``probe-timeout`` late),
    ``BackendUnavailable`` when nobody listens. A server that answers again clears the verdict.
    """

    def __init__(self, host: str, port: int, *, probe_timeout: float, request_timeout: float,
                 user: str = "flowbus", interval: float = 0.0) -> None:
        self.host, self.port, self.user = host, port, user
        self.probe_timeout = probe_timeout
        self.request_timeout = request_timeout
        #: the poll interval: the next probe is due this long after the last answered one started
        self.interval = interval
        #: monotonic time the first unanswered probe started (None while the server answers)
        self.stuck_since: float | None = None
        #: monotonic time the last answered probe started (None before the first answer)
        self.answered_at: float | None = None
        self.answered = 0
        self.slowest = 0.0
        #: the stuck verdict was given (the session went DOWN): later probes wait the full timeout
        self._lost = False
        self._client_host = socket.gethostname()
        self._ping = b""

    @property
    def deadline(self) -> float | None:
        """When a stuck server is declared lost (monotonic), or None: ``interval + probe-timeout +
        request-timeout`` after the last answered probe started (so a poll that ran late does
        not push the verdict back), but never sooner than ``request-timeout`` after the first
        unanswered probe started (a slow server on a busy actor gets one more probe)."""
        if self.stuck_since is None:
            return None
        wait = self.probe_timeout + self.request_timeout
        if self.answered_at is None:
            return self.stuck_since + wait
        return max(self.stuck_since + self.request_timeout,
                   min(self.stuck_since, self.answered_at + self.interval) + wait)

    def stuck_for(self) -> float | None:
        """Seconds the server has been stuck, or None."""
        return None if self.stuck_since is None else time.monotonic() - self.stuck_since

    def check(self) -> bool:
        """Ping once (see class docstring)."""
        if not self._ping:
            self._ping = ping_request(self.user, self._client_host)
        return self.ask(self._ping) is not None

    def ask(self, request: bytes, what: str = "ping") -> dict[str, Any] | None:
        """Send ``request`` (built for ``client_host``) as the liveness probe: its decoded reply,
        or None while the server is stuck; raises as :meth:`check`."""
        started = time.monotonic()
        deadline = self.deadline
        timeout = (self.probe_timeout if deadline is None or self._lost
                   else max(0.001, min(self.probe_timeout, deadline - started)))
        try:
            reply, took = exchange(self.host, self.port, request, timeout, what)
        except BackendTimeout as exc:
            if self._lost:
                raise
            if self.stuck_since is None:
                self.stuck_since = started
                deadline = self.deadline
            assert deadline is not None
            if time.monotonic() >= deadline - 0.001:
                self._lost = True
                raise BackendTimeout(f"{exc}; stuck for {time.monotonic() - self.stuck_since:.2f} s") from None
            return None
        except BackendError:
            self.stuck_since, self._lost = None, False  # dead or garbled, not stuck: lost at once
            raise
        self.stuck_since = None
        self._lost = False
        self.answered_at = started
        self.answered += 1
        self.slowest = max(self.slowest, took)
        return reply

    @property
    def client_host(self) -> str:
        """The host name the requests carry (ecFlow's ``cl_host_``)."""
        return self._client_host

    def next_poll(self, interval: float) -> float:
        """Seconds until the next look: ``interval``, or less when a stuck verdict falls due sooner."""
        deadline = self.deadline
        if deadline is None or self._lost:
            return interval
        return max(0.0, min(interval, deadline - time.monotonic()))


__all__ = ["HEADER_LEN", "Liveness", "ReplyReader", "cts_request", "exchange", "frame", "ping_request", "probe"]
