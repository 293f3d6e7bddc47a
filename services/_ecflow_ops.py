"""The operations an :class:`~flowbus.services.ecflow.EcflowSession` runs through ``call()``,
and the one place where ecFlow's errors become flowbus errors.

``ecflow.Client`` raises a plain ``RuntimeError`` for everything; the server's words tell a
connection failure (``BackendUnavailable``) from a refused request (``BackendRejected``).
Results are plain, picklable data: ``Defs`` and other ecFlow objects travel as their text.
"""

from __future__ import annotations

import contextlib
import enum
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import ecflow

from flowbus.schemas import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)

from ._base import map_errors

#: operation name -> method (see :func:`flowbus.services.dispatch`)
OPERATIONS: Mapping[str, str] = {
    "alter": "_op_alter",
    "begin_all_suites": "_op_begin_all_suites",
    "begin_suite": "_op_begin_suite",
    "ch_register": "_op_ch_register",
    "check": "_op_check",
    "checkpt": "_op_checkpt",
    "client": "_op_client",
    "delete": "_op_delete",
    "force_event": "_op_force_event",
    "force_state": "_op_force_state",
    "force_state_recursive": "_op_force_state_recursive",
    "get_defs": "_op_get_defs",
    "get_file": "_op_get_file",
    "halt_server": "_op_halt_server",
    "kill": "_op_kill",
    "load": "_op_load",
    "ping": "_op_ping",
    "query": "_op_query",
    "replace": "_op_replace",
    "requeue": "_op_requeue",
    "restart_server": "_op_restart_server",
    "restore_from_checkpt": "_op_restore_from_checkpt",
    "resume": "_op_resume",
    "run": "_op_run",
    "server_version": "_op_server_version",
    "shutdown_server": "_op_shutdown_server",
    "stats": "_op_stats",
    "suites": "_op_suites",
    "suspend": "_op_suspend",
    "terminate_server": "_op_terminate_server",
}

#: Client methods the generic ``client`` operation refuses: they would detach the session's
#: client from its server, or are child commands only a job may send
_NOT_GENERIC = frozenset({
    "set_host_port", "set_connection_attempts", "set_retry_connection_period", "reset", "sync_local",
    "news_local", "set_auto_sync", "disable_ssl", "enable_ssl",
}) | frozenset(m for m in dir(ecflow.Client) if m.startswith(("child_", "set_child_")))

_UNREACHABLE = ("failed to connect", "connection error", "connection refused", "is the server running",
                "end of file", "connection reset", "broken pipe", "ran out of end points", "host not found",
                "no route to host", "network is unreachable", "name or service not known")
_TIMED_OUT = ("timed out after",)


class Phase(enum.Enum):
    NEW = "new"
    UP = "up"
    DOWN = "down"  # lost, reconnecting
    DEAD = "dead"  # gave up reconnecting
    CLOSED = "closed"


def classify(exc: BaseException, operation: str) -> BackendError:
    """The flowbus error for an ecFlow ``RuntimeError``, carrying the server's message."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if any(word in low for word in _TIMED_OUT):
        return BackendTimeout(f"{operation}: {text}")
    if any(word in low for word in _UNREACHABLE):
        return BackendUnavailable(f"{operation}: {text}")
    return BackendRejected(f"{operation}: {text}")


@contextlib.contextmanager
def ecflow_errors(operation: str) -> Iterator[None]:
    """``RuntimeError`` by its text (see :func:`classify`); wrong argument types (Boost's
    ``ArgumentError`` is a ``TypeError``) and bad values are ``BackendRejected``. Chained."""
    with map_errors({TypeError: BackendRejected, ValueError: BackendRejected, OSError: BackendUnavailable},
                    operation):
        try:
            yield
        except RuntimeError as exc:
            raise classify(exc, operation) from exc


def plain(value: Any) -> Any:
    """A picklable copy of an ecFlow result: Defs, nodes and enums as their text, containers recursed."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, int):  # a Boost.Python enum value (a subclass of int)
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if type(value).__name__.endswith(("Vec", "List")):  # ecFlow's vector wrappers
        return [plain(v) for v in value]
    return str(value)


def _enum(kind: Any, value: Any, what: str) -> Any:
    if isinstance(value, kind):
        return value
    names = {n.lower(): v for n, v in kind.names.items()}
    got = names.get(str(value).lower())
    if got is None:
        raise BackendRejected(f"{what}: {value!r} is not one of {sorted(names)}")
    return got


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise BackendRejected(f"{what}: expects a non-empty str, got {value!r}")
    return value


class EcflowOperations:
    """Mixin: the ``call()`` operations. The session provides the lock, the client and state."""

    name: str
    _lock: threading.RLock
    _client: Any
    _phase: Phase
    _log: Any
    _handle: tuple[bool, list[str]] | None

    @contextlib.contextmanager
    def _using(self, operation: str) -> Iterator[Any]:
        """The client, under the lock, with ecFlow errors mapped at this edge."""
        with self._lock:
            if self._phase is not Phase.UP or self._client is None:
                raise BackendUnavailable(f"{operation}: session {self.name!r} is not connected ({self._phase.value})")
            self._log.debug("ecflow.call.started", operation=operation)
            try:
                with ecflow_errors(operation):
                    yield self._client
            except BackendError as exc:
                self._log.warning("ecflow.call.failed", operation=operation, error=str(exc))
                raise
            self._log.debug("ecflow.call.complete", operation=operation)

    def _refresh(self, client: Any) -> None:
        """The client's defs were replaced outside poll(): diff them now so nothing is skipped."""
        raise NotImplementedError

    def _simple(self, operation: str, *args: Any) -> Any:
        with self._using(operation) as client:
            return plain(getattr(client, operation)(*args))

    # -- definitions -------------------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _defs_file(text: str | None, path: str | None, operation: str) -> Iterator[str]:
        """A file holding the definition (ecFlow 5.9 parses definitions only from files)."""
        if (text is None) == (path is None):
            raise BackendRejected(f"{operation}: give exactly one of text= or path=")
        if path is not None:
            yield _str(path, operation)
            return
        fd, tmp = tempfile.mkstemp(prefix="flowbus-ecflow-", suffix=".def")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_str(text, operation))
            yield tmp
        finally:
            os.unlink(tmp)

    def _op_load(self, text: str | None = None, *, path: str | None = None, force: bool = False,
                 check_only: bool = False) -> None:
        """Load a suite definition given as ``text`` or a file ``path`` (``force`` replaces
        suites of the same name). Errors in the definition come back as ``BackendRejected``."""
        with self._defs_file(text, path, "load") as file, self._using("load") as client:
            client.load(file, bool(force), bool(check_only))

    def _op_replace(self, node_path: str, text: str | None = None, *, path: str | None = None,
                    create_parents: bool = True, force: bool = False) -> None:
        """Replace ``node_path`` with the node of the same path in the definition given."""
        with self._defs_file(text, path, "replace") as file, self._using("replace") as client:
            client.replace(_str(node_path, "replace"), file, bool(create_parents), bool(force))

    def _op_get_defs(self) -> str:
        """The server's whole definition (with state) as text."""
        with self._using("get_defs") as client:
            client.get_server_defs()
            defs = client.get_defs()
            text = "" if defs is None else str(defs)
            self._refresh(client)
            return text

    def _op_suites(self) -> list[str]:
        return list(self._simple("suites"))

    def _op_delete(self, path: str, force: bool = False) -> None:
        with self._using("delete") as client:
            client.delete(_str(path, "delete"), bool(force))

    def _op_begin_suite(self, suite: str, force: bool = False) -> None:
        with self._using("begin_suite") as client:
            client.begin_suite(_str(suite, "begin_suite"), bool(force))

    def _op_begin_all_suites(self, force: bool = False) -> None:
        with self._using("begin_all_suites") as client:
            client.begin_all_suites(bool(force))

    # -- nodes -------------------------------------------------------------------------------------

    def _op_suspend(self, path: str) -> None:
        self._simple("suspend", _str(path, "suspend"))

    def _op_resume(self, path: str) -> None:
        self._simple("resume", _str(path, "resume"))

    def _op_requeue(self, path: str, option: str = "") -> None:
        """``option``: "" (all), ``"abort"`` (only aborted) or ``"force"``."""
        if option not in ("", "abort", "force"):
            raise BackendRejected(f"requeue: option must be '', 'abort' or 'force', not {option!r}")
        self._simple("requeue", _str(path, "requeue"), option)

    def _op_force_state(self, path: str, state: str) -> None:
        self._simple("force_state", _str(path, "force_state"), _enum(ecflow.State, state, "force_state"))

    def _op_force_state_recursive(self, path: str, state: str) -> None:
        self._simple("force_state_recursive", _str(path, "force_state_recursive"),
                     _enum(ecflow.State, state, "force_state_recursive"))

    def _op_force_event(self, path: str, signal: str = "set") -> None:
        """``path`` is ``/suite/task:event``; ``signal`` is ``set`` or ``clear``."""
        if signal not in ("set", "clear"):
            raise BackendRejected(f"force_event: signal must be 'set' or 'clear', not {signal!r}")
        self._simple("force_event", _str(path, "force_event"), signal)

    def _op_run(self, path: str, force: bool = False) -> None:
        self._simple("run", _str(path, "run"), bool(force))

    def _op_kill(self, path: str) -> None:
        self._simple("kill", _str(path, "kill"))

    def _op_check(self, path: str = "") -> str:
        """Trigger/complete expression check of ``path`` (all suites when "") as the server's text."""
        with self._using("check") as client:
            return str(client.check(path if path else list(client.suites())))

    def _op_alter(self, path: str, alter_type: str, attr_type: str, name: str = "", value: str = "") -> None:
        """Every ``ecflow_client --alter`` form, e.g. ``alter(path, "change", "label", "info", "x")``."""
        self._simple("alter", _str(path, "alter"), _str(alter_type, "alter"), _str(attr_type, "alter"),
                     str(name), str(value))

    def _op_query(self, query_type: str, path: str, attribute: str = "") -> str:
        """``state``/``dstate``/``repeat``/``event``/``meter``/``label``/``variable``/``trigger``/``limit``..."""
        return str(self._simple("query", _str(query_type, "query"), _str(path, "query"), str(attribute)))

    def _op_get_file(self, path: str, file_type: str = "script", max_lines: int = 10000) -> str:
        """``file_type``: script, job, jobout, manual, kill or stat."""
        return str(self._simple("get_file", _str(path, "get_file"), str(file_type), str(int(max_lines))))

    # -- server ------------------------------------------------------------------------------------

    def _op_ping(self) -> None:
        self._simple("ping")

    def _op_server_version(self) -> str:
        return str(self._simple("server_version"))

    def _op_stats(self) -> None:
        """ecFlow prints the statistics on this process's stdout; nothing is returned."""
        self._simple("stats")

    def _op_checkpt(self, mode: str | None = None, interval: int = 0, alarm: int = 0) -> None:
        """Checkpoint now, or (``mode`` never/on_time/always) change the checkpoint policy."""
        with self._using("checkpt") as client:
            if mode is None and not interval and not alarm:
                client.checkpt()
            else:
                client.checkpt(_enum(ecflow.CheckPt, mode or "undefined", "checkpt"), int(interval), int(alarm))

    def _op_restore_from_checkpt(self) -> None:
        """Load the checkpoint file (the server must be halted and hold no suites)."""
        self._simple("restore_from_checkpt")

    def _op_halt_server(self) -> None:
        self._simple("halt_server")

    def _op_restart_server(self) -> None:
        self._simple("restart_server")

    def _op_shutdown_server(self) -> None:
        self._simple("shutdown_server")

    def _op_terminate_server(self) -> None:
        """Ends the server process: the session then reports it lost and reconnects."""
        self._simple("terminate_server")

    def _op_ch_register(self, auto_add: bool, suites: list[str]) -> int:
        """Observe only ``suites`` through a client handle (re-registered after a server restart)."""
        names = [_str(s, "ch_register") for s in suites]
        with self._using("ch_register") as client:
            client.ch_register(bool(auto_add), names)
            self._handle = (bool(auto_add), names)
            return int(client.ch_handle())

    # -- anything else -----------------------------------------------------------------------------

    def _op_client(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Any public ``ecflow.Client`` method by name, e.g. ``call("client", "zombie_get")``."""
        if not isinstance(method, str) or method.startswith("_") or method in _NOT_GENERIC \
                or not callable(getattr(ecflow.Client, method, None)):
            raise BackendRejected(f"client: {method!r} is not a public ecflow.Client method this session allows")
        if method == "ch_register":
            return self._op_ch_register(*args, **kwargs)
        with self._using(method) as client:
            result = plain(getattr(client, method)(*args, **kwargs))
            if method == "ch_drop":
                self._handle = None
            if method == "get_server_defs":  # swapped the defs poll() diffs: no news would follow
                self._refresh(client)
            return result


__all__ = ["OPERATIONS", "EcflowOperations", "Phase", "classify", "ecflow_errors", "plain"]
