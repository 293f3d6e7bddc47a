"""The operations an :class:`~flowbus.services.ecflow.EcflowSession` runs through ``call()``:
one function per operation, named as the operation, declared with ``@OPS.op``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ecflow

from flowbus.schemas import BackendRejected

from .._ops import Operations
from ._errors import as_enum, as_str, plain
from ._stdout import parse_handles, printed

if TYPE_CHECKING:
    from ._session import EcflowSession

OPS: Operations[EcflowSession] = Operations("ecflow")

#: Client methods the generic ``client`` operation refuses, with why: they would change the client
#: the session observes through (its server, identity, transport or sync), or they are child
#: commands only a job may send
_REFUSED: dict[str, str] = {
    **dict.fromkeys(("set_host_port", "set_user_name", "enable_ssl", "disable_ssl", "set_connection_attempts",
                     "set_retry_connection_period", "reset", "set_auto_sync", "debug"),
                    "it changes the client this session observes the server through"),
    **dict.fromkeys(("sync_local", "news_local"), "the session's poll owns the client's view of the server"),
    **{m: "only a job sends child commands" for m in dir(ecflow.Client) if m.startswith(("child_", "set_child_"))},
}


def _simple(session: EcflowSession, operation: str, *args: Any) -> Any:
    with session._using(operation) as client:
        return plain(getattr(client, operation)(*args))


# -- definitions -------------------------------------------------------------------------------

@contextlib.contextmanager
def _defs_file(text: str | None, path: str | None, operation: str) -> Iterator[str]:
    """A file holding the definition (ecFlow 5.9 parses definitions only from files)."""
    if (text is None) == (path is None):
        raise BackendRejected(f"{operation}: give exactly one of text= or path=")
    if path is not None:
        yield as_str(path, operation)
        return
    fd, tmp = tempfile.mkstemp(prefix="flowbus-ecflow-", suffix=".def")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(as_str(text, operation))
        yield tmp
    finally:
        os.unlink(tmp)

@OPS.op
def load(session: EcflowSession, text: str | None = None, *, path: str | None = None, force: bool = False,
             check_only: bool = False) -> None:
    """Load a suite definition given as ``text`` or a file ``path`` (``force`` replaces
    suites of the same name). Errors in the definition come back as ``BackendRejected``."""
    with _defs_file(text, path, "load") as file, session._using("load") as client:
        client.load(file, bool(force), bool(check_only))

@OPS.op
def replace(session: EcflowSession, node_path: str, text: str | None = None, *, path: str | None = None,
                create_parents: bool = True, force: bool = False) -> None:
    """Replace ``node_path`` with the node of the same path in the definition given."""
    with _defs_file(text, path, "replace") as file, session._using("replace") as client:
        client.replace(as_str(node_path, "replace"), file, bool(create_parents), bool(force))

@OPS.op
def get_defs(session: EcflowSession) -> str:
    """The server's whole definition (with state) as text."""
    with session._using("get_defs") as client:
        client.get_server_defs()
        defs = client.get_defs()
        text = "" if defs is None else str(defs)
        session._refresh(client)
        return text

@OPS.op
def suites(session: EcflowSession) -> list[str]:
    return list(_simple(session, "suites"))

@OPS.op
def delete(session: EcflowSession, path: str, force: bool = False) -> None:
    with session._using("delete") as client:
        client.delete(as_str(path, "delete"), bool(force))

@OPS.op
def begin_suite(session: EcflowSession, suite: str, force: bool = False) -> None:
    with session._using("begin_suite") as client:
        client.begin_suite(as_str(suite, "begin_suite"), bool(force))

@OPS.op
def begin_all_suites(session: EcflowSession, force: bool = False) -> None:
    with session._using("begin_all_suites") as client:
        client.begin_all_suites(bool(force))

# -- nodes -------------------------------------------------------------------------------------

@OPS.op
def suspend(session: EcflowSession, path: str) -> None:
    _simple(session, "suspend", as_str(path, "suspend"))

@OPS.op
def resume(session: EcflowSession, path: str) -> None:
    _simple(session, "resume", as_str(path, "resume"))

@OPS.op
def requeue(session: EcflowSession, path: str, option: str = "") -> None:
    """``option``: "" (all), ``"abort"`` (only aborted) or ``"force"``."""
    if option not in ("", "abort", "force"):
        raise BackendRejected(f"requeue: option must be '', 'abort' or 'force', not {option!r}")
    _simple(session, "requeue", as_str(path, "requeue"), option)

@OPS.op
def force_state(session: EcflowSession, path: str, state: str) -> None:
    _simple(session, "force_state", as_str(path, "force_state"), as_enum(ecflow.State, state, "force_state"))

@OPS.op
def force_state_recursive(session: EcflowSession, path: str, state: str) -> None:
    _simple(session, "force_state_recursive", as_str(path, "force_state_recursive"),
                 as_enum(ecflow.State, state, "force_state_recursive"))

@OPS.op
def force_event(session: EcflowSession, path: str, signal: str = "set") -> None:
    """``path`` is ``/suite/task:event``; ``signal`` is ``set`` or ``clear``."""
    if signal not in ("set", "clear"):
        raise BackendRejected(f"force_event: signal must be 'set' or 'clear', not {signal!r}")
    _simple(session, "force_event", as_str(path, "force_event"), signal)

@OPS.op
def run(session: EcflowSession, path: str, force: bool = False) -> None:
    _simple(session, "run", as_str(path, "run"), bool(force))

@OPS.op
def kill(session: EcflowSession, path: str) -> None:
    _simple(session, "kill", as_str(path, "kill"))

@OPS.op
def check(session: EcflowSession, path: str = "") -> str:
    """Trigger/complete expression check of ``path`` (all suites when "") as the server's text."""
    with session._using("check") as client:
        return str(client.check(path if path else list(client.suites())))

@OPS.op
def alter(session: EcflowSession, path: str, alter_type: str, attr_type: str, name: str = "", value: str = "") -> None:
    """Every ``ecflow_client --alter`` form, e.g. ``alter(path, "change", "label", "info", "x")``."""
    _simple(session, "alter", as_str(path, "alter"), as_str(alter_type, "alter"), as_str(attr_type, "alter"),
                 str(name), str(value))

@OPS.op
def query(session: EcflowSession, query_type: str, path: str, attribute: str = "") -> str:
    """``state``/``dstate``/``repeat``/``event``/``meter``/``label``/``variable``/``trigger``/``limit``..."""
    return str(_simple(session, "query", as_str(query_type, "query"), as_str(path, "query"), str(attribute)))

@OPS.op
def get_file(session: EcflowSession, path: str, file_type: str = "script", max_lines: int = 10000) -> str:
    """``file_type``: script, job, jobout, manual, kill or stat."""
    return str(_simple(session, "get_file", as_str(path, "get_file"), str(file_type), str(int(max_lines))))

# -- server ------------------------------------------------------------------------------------

@OPS.op
def ping(session: EcflowSession) -> None:
    _simple(session, "ping")

@OPS.op
def server_version(session: EcflowSession) -> str:
    return str(_simple(session, "server_version"))

@OPS.op
def stats(session: EcflowSession) -> str:
    """The server's statistics, as the text ``ecflow_client --stats`` shows (ecFlow prints them
    on fd 1; they are captured there, see :mod:`._stdout`)."""
    with session._using("stats") as client:
        return printed(client.stats)

@OPS.op
def checkpt(session: EcflowSession, mode: str | None = None, interval: int = 0, alarm: int = 0) -> None:
    """Checkpoint now, or (``mode`` never/on_time/always) change the checkpoint policy."""
    with session._using("checkpt") as client:
        if mode is None and not interval and not alarm:
            client.checkpt()
        else:
            client.checkpt(as_enum(ecflow.CheckPt, mode or "undefined", "checkpt"), int(interval), int(alarm))

@OPS.op
def restore_from_checkpt(session: EcflowSession) -> None:
    """Load the checkpoint file (the server must be halted and hold no suites)."""
    _simple(session, "restore_from_checkpt")

@OPS.op
def halt_server(session: EcflowSession) -> None:
    _simple(session, "halt_server")

@OPS.op
def restart_server(session: EcflowSession) -> None:
    _simple(session, "restart_server")

@OPS.op
def shutdown_server(session: EcflowSession) -> None:
    _simple(session, "shutdown_server")

@OPS.op
def terminate_server(session: EcflowSession) -> None:
    """Ends the server process: the session then reports it lost and reconnects."""
    _simple(session, "terminate_server")

#: how many arguments the handle methods take when the first is a handle number
_WITH_HANDLE = {"ch_add": 2, "ch_remove": 2, "ch_auto_add": 2, "ch_drop": 1}

# -- the session's change handle ------------------------------------------------------------------
# What the handle holds is remembered (session._handle: auto_add, suite names) and registered
# again when the server restarts and forgets it.

def _names(suites: Any, operation: str) -> list[str]:
    if not isinstance(suites, (list, tuple)):
        raise BackendRejected(f"{operation}: expects a list of suite names, got {suites!r}")
    return list(dict.fromkeys(as_str(s, operation) for s in suites))


def _own_handle(session: EcflowSession, client: Any, operation: str) -> tuple[int, bool, list[str]]:
    if session._handle is None:
        raise BackendRejected(f"{operation}: the session has no change handle (call ch_register first)")
    return int(client.ch_handle()), *session._handle

@OPS.op
def ch_register(session: EcflowSession, auto_add: bool, suites: list[str]) -> int:
    """Observe only ``suites`` (and, with ``auto_add``, suites created later) through a client
    handle; the set is remembered and registered again after a server restart. Returns the handle."""
    names = _names(suites, "ch_register")
    with session._using("ch_register") as client:
        client.ch_register(bool(auto_add), names)
        session._handle = (bool(auto_add), names)
        return int(client.ch_handle())

@OPS.op
def ch_add(session: EcflowSession, suites: list[str]) -> None:
    """Add ``suites`` to the session's handle (remembered)."""
    names = _names(suites, "ch_add")
    with session._using("ch_add") as client:
        handle, auto, known = _own_handle(session, client, "ch_add")
        client.ch_add(handle, names)
        session._handle = (auto, [*known, *(n for n in names if n not in known)])

@OPS.op
def ch_remove(session: EcflowSession, suites: list[str]) -> None:
    """Remove ``suites`` from the session's handle (remembered)."""
    names = _names(suites, "ch_remove")
    with session._using("ch_remove") as client:
        handle, auto, known = _own_handle(session, client, "ch_remove")
        client.ch_remove(handle, names)
        session._handle = (auto, [n for n in known if n not in names])

@OPS.op
def ch_auto_add(session: EcflowSession, auto_add: bool) -> None:
    """Whether suites created later join the session's handle (remembered)."""
    with session._using("ch_auto_add") as client:
        handle, _auto, known = _own_handle(session, client, "ch_auto_add")
        client.ch_auto_add(handle, bool(auto_add))
        session._handle = (bool(auto_add), known)

@OPS.op
def ch_drop(session: EcflowSession) -> None:
    """Drop the session's handle: the session observes every suite again."""
    with session._using("ch_drop") as client:
        _own_handle(session, client, "ch_drop")
        client.ch_drop()
        session._handle = None
        client.reset()  # the next sync is full: the suites outside the handle come back

@OPS.op
def ch_suites(session: EcflowSession) -> str:
    """Every handle registered on the server with its suites, as ``ecflow_client --ch_suites``
    shows them (``User handle suites``, one line per handle; captured from fd 1)."""
    with session._using("ch_suites") as client:
        return printed(client.ch_suites)


def _handle_method(session: EcflowSession, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``client("ch_add"|"ch_remove"|"ch_auto_add"|"ch_drop"|"ch_drop_user", ...)``: on the
    session's own handle (no handle argument, or its number) the typed operation runs, so the
    change is remembered; another client's handle is passed through as it is. One hold of the
    session's lock: the handle cannot change between the check and the call."""
    with session._lock:
        if method == "ch_drop_user":
            result = _passed(session, method, args, kwargs)
            with session._using(method) as client:
                if session._handle is not None and client.ch_handle() not in parse_handles(printed(client.ch_suites)):
                    session._handle = None  # ours was among them
                    client.reset()
            return result
        given = len(args) == _WITH_HANDLE[method]  # ecFlow's overloads: (handle, ...) or (...)
        with session._using(method) as client:
            own = session._handle is not None and (not given or args[0] == client.ch_handle())
        if not own or kwargs:
            return _passed(session, method, args, kwargs)
        typed: dict[str, Any] = {"ch_add": ch_add, "ch_remove": ch_remove, "ch_auto_add": ch_auto_add,
                                 "ch_drop": ch_drop}
        return typed[method](session, *(args[1:] if given else args))


def _passed(session: EcflowSession, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with session._using(method) as client:
        return plain(getattr(client, method)(*args, **kwargs))

# -- anything else -----------------------------------------------------------------------------

@OPS.op
def client(session: EcflowSession, method: str, *args: Any, **kwargs: Any) -> Any:
    """Any public ``ecflow.Client`` method by name, e.g. ``call("client", "zombie_get")``."""
    if not isinstance(method, str) or method.startswith("_") or not callable(getattr(ecflow.Client, method, None)):
        raise BackendRejected(f"client: {method!r} is not a public ecflow.Client method")
    why = _REFUSED.get(method)
    if why is not None:
        raise BackendRejected(f"client: {method!r} is refused on session {session.name!r}: {why}")
    if method == "ch_register":
        return ch_register(session, *args, **kwargs)
    if method in ("stats", "ch_suites"):
        return OPS.table()[method](session, *args, **kwargs)
    if method in ("ch_add", "ch_remove", "ch_auto_add", "ch_drop", "ch_drop_user"):
        return _handle_method(session, method, args, kwargs)
    with session._using(method) as client:
        result = plain(getattr(client, method)(*args, **kwargs))
        if method == "get_server_defs":  # swapped the defs poll() diffs: no news would follow
            session._refresh(client)
        return result
