"""ecFlow's NEWS request spoken on a socket of our own, so that the poll that finds nothing new
(nearly every poll) costs the actor no GIL-holding ``ecflow.Client`` call, and a server that stops
answering costs the session only a wait in ``recv`` with the GIL released. The zombie list is
asked the same way (``CtsCmd`` api 9, answered by a ``ZombieGetCmd``): while the server lists
none and the session knows none, the once-a-second zombie read makes no client call either.

The wire (ecFlow 5.x, cereal JSON, framed as in :mod:`._probe`): the request is a
``ClientToServerRequest`` holding a ``CSyncCmd`` with ``api_`` 0 (NEWS), the client's change
handle and the state and modify change numbers of the client's last sync; the server answers a
``ServerToClientResponse`` holding an ``SNewsCmd`` whose ``news_`` is 0 (no news), 1 (news) or
2 (do a full sync: the numbers or the handle are unknown to the server, e.g. it restarted), or an
``ErrorCmd`` with the server's ``error_msg_``. The server closes the connection after each reply.

The handle and the numbers are what ``ecflow.Client.news_local()`` itself sends: the binding's
change handle (``ch_handle()``) and the change numbers of the client's defs. The 5.9 Python API
does not expose those numbers; the defs print them on their first line in any style but DEFS
(``defs_state MIGRATE state_change:N modify_change:M``). :func:`read_marks` prints the defs in
MIGRATE style (about 0.8 us per node; ``save_as_defs`` sets the style for that one call, so no
other thread's printing changes style) into an in-memory file and reads that line.

Sans-I/O: :func:`news_request`, :func:`news_of`; the socket part is :func:`._probe.exchange`
(through :class:`._probe.Liveness`, which keeps the stuck/lost verdicts).
"""

from __future__ import annotations

import enum
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from flowbus.schemas import BackendProtocolError, BackendRejected

from ._probe import cts_request

#: CSyncCmd's api number of NEWS
_NEWS_API = 0
#: CtsCmd's api number of GET_ZOMBIES
_ZOMBIES_API = 9
_STATE = re.compile(rb"\bstate_change:(\d+)")
_MODIFY = re.compile(rb"\bmodify_change:(\d+)")


class News(enum.IntEnum):
    """``SNewsCmd``'s answer (ecFlow's ``ServerReply::News_t``)."""

    NO_NEWS = 0
    NEWS = 1
    DO_FULL_SYNC = 2


@dataclass(frozen=True)
class Marks:
    """What the client's last sync left: its change handle (0: none) and the change numbers."""

    handle: int = 0
    state_change: int = 0
    modify_change: int = 0


def news_request(user: str, host: str, marks: Marks) -> bytes:
    """The framed bytes of ecFlow's NEWS request with the client's handle and change numbers."""
    return cts_request("CSyncCmd", user, host, {"api_": _NEWS_API, "client_handle_": marks.handle,
                                                "client_state_change_no_": marks.state_change,
                                                "client_modify_change_no_": marks.modify_change})


def zombies_request(user: str, host: str) -> bytes:
    """The framed bytes of ecFlow's zombie-list request (``zombie_get``)."""
    return cts_request("CtsCmd", user, host, {"api_": _ZOMBIES_API})


def news_of(reply: dict[str, Any], where: str) -> News:
    """The news in a decoded reply (see :class:`._probe.ReplyReader`). Raises ``BackendRejected``
    (the server answered with an error: its message) or ``BackendProtocolError`` (a reply that is
    not an answer to NEWS), both naming ``where``."""
    value = _answer(reply, "SNewsCmd", "news", where).get("news_")
    if type(value) is not int or value not in News._value2member_map_:
        raise BackendProtocolError(f"ecFlow news from {where}: news_ {value!r} is not one of 0, 1, 2")
    return News(value)


def zombie_count(reply: dict[str, Any], where: str) -> int:
    """How many zombies the server lists (the reply to :func:`zombies_request`); errors as
    :func:`news_of`. The zombies themselves are read through the binding when there are any."""
    zombies = _answer(reply, "ZombieGetCmd", "zombie list", where).get("zombies_")
    if not isinstance(zombies, list):
        raise BackendProtocolError(f"ecFlow zombie list from {where}: zombies_ {str(zombies)[:40]!r} is not a list")
    return len(zombies)


def _answer(reply: dict[str, Any], expected: str, what: str, where: str) -> dict[str, Any]:
    """The data of the reply's command, when it is ``expected``."""
    cmd = _stc_cmd(reply)
    name = cmd.get("polymorphic_name") if isinstance(cmd, dict) else None
    wrapper = cmd.get("ptr_wrapper") if isinstance(cmd, dict) else None
    data = wrapper.get("data") if isinstance(wrapper, dict) else None
    if name == "ErrorCmd" and isinstance(data, dict):
        raise BackendRejected(f"ecFlow {what} from {where}: the server refused: {data.get('error_msg_', '')}".strip())
    if name != expected or not isinstance(data, dict):
        raise BackendProtocolError(f"ecFlow {what} from {where}: expected an {expected} reply, got "
                                   f"{name or str(reply)[:80]!r} (probe-timeout = 0 uses the ecflow binding)")
    return data


def _stc_cmd(reply: dict[str, Any]) -> Any:
    for key, body in reply.items():
        if key.endswith("ServerToClientResponse") and isinstance(body, dict):
            return body.get("stc_cmd_")
    return None


def marks_from(head: bytes, handle: int) -> Marks:
    """The marks in the first line of printed defs (absent numbers are 0, as ecFlow prints them)."""
    first = head.split(b"\n", 2)
    line = next((x for x in first if x.startswith(b"defs_state")), b"")
    state, modify = _STATE.search(line), _MODIFY.search(line)
    return Marks(handle, int(state.group(1)) if state else 0, int(modify.group(1)) if modify else 0)


class _Printer:
    """One in-memory file per process that the defs are printed into (a lock serialises its use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path = ""

    def head(self, defs: Any) -> bytes:
        import ecflow

        with self._lock:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            defs.save_as_defs(self._path, ecflow.Style.MIGRATE)
            return os.pread(self._fd, 512, 0)

    def _open(self) -> None:
        fd = os.memfd_create("flowbus-ecflow-marks", os.MFD_CLOEXEC)
        self._fd, self._path = fd, f"/proc/self/fd/{fd}"


_PRINTER = _Printer()


def read_marks(client: Any) -> Marks:
    """The handle and change numbers ``client.news_local()`` would send now (no I/O to the server)."""
    handle = int(client.ch_handle())
    defs = client.get_defs()
    if defs is None:
        return Marks(handle)
    return marks_from(_PRINTER.head(defs), handle)


__all__ = ["Marks", "News", "marks_from", "news_of", "news_request", "read_marks", "zombie_count", "zombies_request"]
