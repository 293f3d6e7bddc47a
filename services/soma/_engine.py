"""The soma-workflow controller as a :class:`~flowbus.services.soma.SomaSession` holds it:
building one (the process-global knobs soma reads are set under one lock and restored), telling
whether it is still alive, finding its job processes, and ending every thread it started.

soma keeps three threads per light-mode controller in the calling process (``poll_thread``,
``scheduler_loop`` and the engine loop) plus one ``Popen`` per running job, and records no job
PIDs anywhere: the session harvests them from the local scheduler at each poll (:func:`job_pids`)
so orphaned jobs can be killed by PID after a controller death.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psutil
import soma_workflow.database_server as soma_db
import soma_workflow.engine as soma_engine
import soma_workflow.schedulers.local_scheduler as soma_local
import structlog
from soma_workflow import configuration as soma_configuration
from soma_workflow.client import WorkflowController
from soma_workflow.errors import DatabaseError, UnknownObjectError

from flowbus.schemas import BackendUnavailable, SomaSessionConfig

_log = structlog.get_logger("flowbus.soma")

#: soma reads ``engine.refreshment_interval`` and writes ``SOMA_WORKFLOW_CONFIG`` while a
#: controller is built: one construction at a time in the process
_BUILD_LOCK = threading.Lock()
PID_FILE = "flowbus-soma-pids.json"


class _QuietController(WorkflowController):  # type: ignore[misc]  # soma-workflow is untyped
    """soma's controller without the ``print`` in ``__del__`` (the session stops it itself)."""

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_engine()


def _popen_new_session(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
    """Job processes in their own session (no signal from the host's terminal or process group)."""
    kwargs.setdefault("close_fds", True)
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(*args, **kwargs)


def _install_popen_shim() -> None:
    """soma's LocalScheduler starts jobs with ``subprocess.Popen`` from its own module alias;
    give it one that starts them in a new session (the rule for processes started in an actor)."""
    current = getattr(soma_local, "subprocess", None)
    if getattr(current, "_flowbus_shim", False):
        return
    shim = types.SimpleNamespace(Popen=_popen_new_session, PIPE=subprocess.PIPE, _flowbus_shim=True)
    soma_local.subprocess = shim


def _check_row(what: str, table: str, column: str) -> Any:
    """soma 6.0.13's ``_check_transfer`` / ``_check_temporary`` with their bug fixed: an unknown
    id reached ``.with_traceback(sys.exc_info[2])`` (no call), so soma raised ``TypeError:
    'builtin_function_or_method' object is not subscriptable`` instead of its own
    ``UnknownObjectError`` (and left the connection open). Same query, same message."""

    def check(self: Any, connection: Any, cursor: Any, ident: Any, user_id: Any) -> None:
        try:
            row = next(cursor.execute(f"SELECT {column} FROM {table} WHERE {column}=? and user_id=? LIMIT 1",  # noqa: S608 - fixed names
                                      [ident, user_id]), None)
        except Exception as exc:
            cursor.close()
            connection.close()
            raise DatabaseError(exc) from exc
        if row is None:
            cursor.close()
            connection.close()
            raise UnknownObjectError(f"The {what} {ident!r} is not valid or does not belong to user {user_id!r}")

    return check


def _signal_transfer_ended(self: Any, transfer_id: Any, workflow_id: Any) -> None:
    """soma 6.0.13's ``signalTransferEnded`` with two bugs fixed.

    - It skips ``workflow_id == -1`` but a transfer registered alone has ``None``: soma then
      failed with an empty ``DatabaseError`` (from ``StopIteration``) after the file was copied.
      Alone, there is no workflow to tell.
    - It records the signal at any moment, but one pass of the engine loop (under the loop's
      lock) reads its workflows' transfer statuses first and takes the signals after. A copy
      that ended between the two (``set_transfer_status`` then this signal, from the client's
      thread) was taken with its old status: the workflow was looked at once, its jobs still
      waited for the file, and no later signal came, so it stayed ``worklflow_not_started`` for
      good. Recording the signal under the loop's lock puts it before the pass (which then reads
      the new status) or after it (the next pass takes it)."""
    if workflow_id is None or workflow_id == -1:
        return
    loop = getattr(self, "engine_loop", None)
    lock = getattr(loop, "_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        self._database_server.add_workflow_ended_transfer(workflow_id, transfer_id)


def _install_soma_fixes() -> None:
    """Fix, once per process, the soma-workflow 6.0.13 bugs the transfer operations hit."""
    cls = soma_db.WorkflowDatabaseServer
    if getattr(cls, "_flowbus_fixed", False):
        return
    cls._check_transfer = _check_row("transfer", "transfers", "id")
    cls._check_temporary = _check_row("temporary path", "temporary_paths", "temp_path_id")
    soma_engine.WorkflowEngine.signalTransferEnded = _signal_transfer_ended
    cls._flowbus_fixed = True


@dataclass
class Built:
    """A controller, where it lives, and the engine parts it started (kept apart from the
    controller: ``stop_engine`` drops the controller's references, not the threads)."""

    controller: Any
    address: str
    engine: Any = None
    scheduler: Any = None
    threads: tuple[threading.Thread, ...] = ()

    def dead_reason(self) -> str:
        """Why the controller cannot work any more ("" while it is alive)."""
        if getattr(self.controller, "_engine_proxy", None) is None:
            return "the controller's engine is gone (stop_engine was called)"
        if self.engine is None:
            return ""
        if not getattr(self.engine.engine_loop, "_running", True):
            return "the soma engine loop was stopped"
        for t in self.threads:
            if not t.is_alive():
                return f"the soma thread {t.name!r} is dead"
        return ""

    def job_procs(self) -> dict[int, Any]:
        """soma job id -> ``Popen`` of each job the local scheduler runs now."""
        sched = self.scheduler
        if sched is None:
            return {}
        with sched._lock:
            procs = dict(sched._processes)
        out: dict[int, Any] = {}
        for drmaa_id, proc in procs.items():
            with contextlib.suppress(ValueError, TypeError):
                out[int(drmaa_id)] = proc
        return out

    def shutdown(self, timeout: float = 5.0, kill_jobs: bool = True) -> list[str]:
        """End the engine and scheduler threads and (unless ``kill_jobs`` is False: a release
        leaves them to the next incarnation) kill the remaining job processes.

        Returns the names of threads still alive afterwards (empty when all ended)."""
        eng, sched = self.engine, self.scheduler
        if eng is not None:
            eng.engine_loop.stop_loop()
            with contextlib.suppress(Exception):
                sched.jobs_finished_event.set()  # wake the loop now
        for proc in self.job_procs().values() if kill_jobs else ():
            kill_tree(proc.pid)
            with contextlib.suppress(Exception):
                proc.wait(timeout=3.0)
        if sched is not None:
            with sched._lock:
                sched.stop_thread_loop = True
                sched._stop_process_loop = True
            sched._poll_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            self.controller.stop_engine()
        return [t.name for t in self.threads if t.is_alive()]


def build(cfg: SomaSessionConfig, directory: str) -> Built:
    """A new ``WorkflowController`` for ``cfg`` (``directory`` for light mode).

    Raises ``BackendUnavailable`` naming the session when soma cannot start (with soma's message)."""
    _install_popen_shim()
    _install_soma_fixes()
    with _BUILD_LOCK:
        saved_interval = soma_engine.refreshment_interval
        saved_env = os.environ.get("SOMA_WORKFLOW_CONFIG")
        soma_engine.refreshment_interval = float(cfg.engine_refresh)
        try:
            with quiet():
                if cfg.mode == "light":
                    os.makedirs(directory, exist_ok=True)
                    wc = _QuietController(isolated_light_mode=directory)
                    address = directory
                else:
                    config = None
                    if cfg.config_file:
                        config = soma_configuration.Configuration.load_from_file(
                            cfg.resource_id or None, cfg.config_file)
                    wc = _QuietController(resource_id=cfg.resource_id or None, login=cfg.login or None,
                                          password=cfg.password or None, config=config)
                    address = f"resource:{cfg.resource_id or 'default'}"
        except Exception as exc:
            raise BackendUnavailable(f"session {cfg.name!r}: cannot start a soma WorkflowController ({cfg.mode} mode, "
                                     f"{directory or cfg.resource_id!r}): soma {soma_message(exc)}") from exc
        finally:
            soma_engine.refreshment_interval = saved_interval
            if saved_env is None:
                os.environ.pop("SOMA_WORKFLOW_CONFIG", None)
            else:
                os.environ["SOMA_WORKFLOW_CONFIG"] = saved_env
    proxy = getattr(wc, "_engine_proxy", None)
    eng = proxy if proxy is not None and hasattr(proxy, "engine_loop") else None
    sched = None if eng is None else getattr(eng.engine_loop, "_scheduler", None)
    threads: list[threading.Thread] = []
    if eng is not None:
        threads.append(eng.engine_loop_thread)
        for attr in ("_loop", "_poll_thread"):
            t = getattr(sched, attr, None)
            if isinstance(t, threading.Thread):
                threads.append(t)
    if sched is not None and cfg.proc_nb > 0:
        sched.change_proc_nb(int(cfg.proc_nb))  # not scheduler_config: its observer writes ~/ files
    return Built(wc, address, eng, sched, tuple(threads))


def kill_tree(pid: int, create_time: float | None = None) -> bool:
    """SIGKILL job ``pid``, its descendants and its process group (jobs start in a session of
    their own, so the group outlives a leader that was killed alone, e.g. by Ray's cleanup of a
    dead worker's direct children). With ``create_time``, only that process, and only group
    members started after it (a reused PID is left alone). True when something was killed."""
    victims: dict[int, psutil.Process] = {}
    try:
        proc = psutil.Process(pid)
        if create_time is None or abs(proc.create_time() - create_time) <= 0.01:
            victims[pid] = proc
            for child in proc.children(recursive=True):
                victims[child.pid] = child
    except psutil.Error:
        pass
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid not in victims and os.getpgid(p.pid) == pid and \
                    (create_time is None or p.create_time() >= create_time - 0.01):
                victims[p.pid] = p
    for p in victims.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(victims.values()), timeout=3.0)
    return bool(victims)


def soma_message(exc: BaseException) -> str:
    """soma's own words for ``exc``: its type and message; when soma gave none (a
    ``DatabaseError`` wrapping a ``StopIteration``), those of the exception it wraps."""
    seen: set[int] = set()
    chain: list[str] = []
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).strip()
        chain.append(type(cur).__name__)
        if text:
            return f"{' from '.join(chain)}: {text}"
        inner = next((a for a in cur.args if isinstance(a, BaseException)), None)
        cur = inner or cur.__cause__ or cur.__context__
    return f"{' from '.join(chain)} (soma gave no message)"


# -- the PID record (survives the process: a later incarnation kills what this one left) ----------


def save_pids(directory: str, pids: Mapping[int, tuple[int, float]]) -> None:
    """Write soma job id -> (pid, create time) atomically next to soma's database."""
    path = os.path.join(directory, PID_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({str(k): list(v) for k, v in pids.items()}, f)
    os.replace(tmp, path)


def load_pids(directory: str) -> dict[int, tuple[int, float]]:
    try:
        with open(os.path.join(directory, PID_FILE)) as f:
            raw = json.load(f)
        return {int(k): (int(v[0]), float(v[1])) for k, v in raw.items()}
    except (OSError, ValueError, TypeError, IndexError):
        return {}


def create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_saved_stdout: Any = None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Discard what soma prints on stdout (construction, restart_jobs). Safe across threads:
    ``sys.stdout`` is swapped once while any thread is inside, and restored by the last one out
    (``contextlib.redirect_stdout`` in two threads at once can leave it swapped for good)."""
    global _quiet_depth, _saved_stdout  # noqa: PLW0603 - sys.stdout is process-wide too
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            _saved_stdout = sys.stdout
            sys.stdout = _Discard()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                sys.stdout = _saved_stdout
                _saved_stdout = None


__all__ = ["Built", "build", "create_time", "kill_tree", "load_pids", "quiet", "save_pids", "soma_message"]
