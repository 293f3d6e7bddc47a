"""The soma-workflow backend session: one ``WorkflowController`` observed by polling.

Observation: soma has no notifications. Each poll lists the controller's workflows and reads
``workflow_elements_status`` of every workflow that is not settled (done, with every job's exit
information written); settled ones cost one ``workflow_status``. Differences become
``StateChanged`` events (``observed=poll``; ``resync`` for the comparison with ``known`` at
start and after a recovery). Keys: ``<workflow id>`` and ``<workflow id>/<job name>``; states
and exit information as in :mod:`._wf`. The engine loop period (``engine-refresh``) bounds
how fast anything changes: polling faster gains nothing.

Liveness and recovery: the light-mode engine is three threads of this process. When one dies,
the engine loop is stopped, or the controller's engine is gone, the session publishes
``Disconnected``, ends what is left of the old controller (threads joined, its job processes
killed by PID and reaped, so nothing runs twice), builds a new controller on the same directory
(``Connected``), and per workflow left in progress either force-stops and restarts it
(``reattach``: the failed and unfinished jobs run again) or deletes it and submits it again from
the session's record (``resubmit``), each with a ``RecoveryAttempted``; then the ``resync`` diff
and ``Resynced``. Failed attempts back off; ``RecoveryGaveUp`` after ``recovery-attempts``.
Job PIDs are also written to ``flowbus-soma-pids.json`` in the directory, so a later incarnation
(an actor restarted after a crash, same directory) kills what the previous one left running
before it recovers those workflows the same way.

Threads: :meth:`SomaSession.poll` runs on one worker thread, :meth:`SomaSession.call` may come
from any thread. Controller calls are not serialised (soma opens one sqlite connection per call),
so a ``wait_workflow`` does not stall polling; the lock guards the session's bookkeeping and the
controller swap during recovery.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

import soma_workflow.constants as C  # noqa: N812 - C.DONE, C.FAILED: constants, named like them
import structlog

from flowbus.schemas import (
    BackendError,
    BackendRejected,
    BackendUnavailable,
    Connected,
    Disconnected,
    Event,
    Observed,
    RecoveryAttempted,
    RecoveryGaveUp,
    Resynced,
    SomaSessionConfig,
)

from .._base import Backoff, Emit, dispatch
from ._engine import Built, build, create_time, kill_tree, load_pids, save_pids
from ._ops import OPERATIONS, SomaOperations, soma_errors_to_flowbus
from ._wf import Tracker, WfSnap, from_record, job_names, read_workflow, serialize

_IDLE_S = 0.5
_FAILS_BEFORE_LOST = 3


class Phase(enum.Enum):
    NEW = "new"
    UP = "up"
    DOWN = "down"  # controller lost, recovering
    DEAD = "dead"  # gave up (or recovery = none)
    CLOSED = "closed"


def _version() -> str:
    try:
        from soma_workflow.info import __version__

        return str(__version__)
    except Exception:  # noqa: BLE001 - only a label: any failure reads as unknown
        return "?"


class SomaSession(SomaOperations):
    """A session with one soma-workflow ``WorkflowController`` (implements ``BackendSession``).

    Operations (:meth:`call`): ``submit_workflow(workflow, expiration_date=None, name=None,
    queue=None) -> id`` (``workflow``: a flowbus ``WorkflowSpec`` dict/JSON or soma's JSON form),
    ``register_transfer``, ``workflow``, ``workflows``, ``jobs``, ``transfers``, ``job_ids``,
    ``workflow_status``, ``workflow_elements_status``, ``job_status``, ``job_termination_status``,
    ``transfer_status``, ``stop_workflow``, ``restart_workflow``, ``delete_workflow``,
    ``stop_jobs``, ``restart_jobs``, ``change_workflow_expiration_date`` (ISO text),
    ``wait_workflow``/``wait_job`` (bounded ``timeout``), ``transfer_files``, ``delete_transfer``,
    ``retrieve_job_stdouterr``, and the Helper functions ``list_failed_jobs``,
    ``delete_all_workflows``, ``transfer_input_files``, ``transfer_output_files``, ``serialize``.

    Errors: ``BackendRejected`` (bad description, unknown workflow/job id, bad argument),
    ``UnknownOperation``, ``BackendUnavailable`` (the controller is down or being recovered).
    """

    backend = "soma"

    def __init__(self, config: SomaSessionConfig) -> None:
        self.config = config
        self.name = config.name
        self._log = structlog.get_logger("flowbus.soma").bind(backend="soma", session_id=config.name)
        self._lock = threading.RLock()
        self._tracker = Tracker(config.name, self.backend)
        self._phase = Phase.NEW
        self._emit: Emit | None = None
        self._built: Built | None = None
        self._directory = ""
        self._created_dir = False
        #: workflow id -> soma job id -> key suffix
        self._names: dict[int, dict[int, str]] = {}
        #: workflow id -> last read (None: read it at the next poll)
        self._seen: dict[int, WfSnap | None] = {}
        #: workflow id -> soma JSON form as submitted (for resubmission)
        self._records: dict[int, dict[str, Any]] = {}
        #: soma job id -> (pid, process create time) of running jobs
        self._pids: dict[int, tuple[int, float]] = {}
        self._fails = 0
        self._attempt = 0
        self._down_reason = ""
        self._backoff = Backoff(first=config.recovery_backoff, cap=max(30.0, config.recovery_backoff))

    # -- introspection -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._directory if self.config.mode == "light" else f"resource:{self.config.resource_id or 'default'}"

    @property
    def phase(self) -> str:
        return self._phase.value

    @property
    def controller(self) -> Any:
        """The current soma ``WorkflowController`` (None while down)."""
        return None if self._built is None else self._built.controller

    @property
    def engine_threads(self) -> tuple[threading.Thread, ...]:
        return () if self._built is None else self._built.threads

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, emit: Emit, known: Mapping[str, Event], *, previous_address: str | None = None) -> None:
        """Build the controller, publish ``Connected``, recover workflows a previous incarnation
        left in progress (light mode, same directory), then the ``resync`` diff to ``known``.

        The directory is ``directory`` from the config, else ``previous_address`` (the last
        incarnation's), else a fresh temporary one. Raises ``BackendUnavailable`` when soma
        cannot start, ``BackendRejected`` for a session that was already started."""
        with self._lock:
            if self._phase is not Phase.NEW:
                raise BackendRejected(f"start: session {self.name!r} was already started")
            cfg = self.config
            made_here = False  # a temporary directory made by this start(): removed if it fails
            if cfg.mode == "light":
                if cfg.directory:
                    self._directory = os.path.abspath(os.path.expanduser(cfg.directory))
                elif previous_address and _is_own_dir(previous_address):
                    self._directory = previous_address
                    # a temporary directory an earlier incarnation created is still ours to remove
                    self._created_dir = os.path.basename(previous_address).startswith(f"flowbus-soma-{self.name}-") \
                        and os.path.dirname(previous_address) == tempfile.gettempdir()
                else:
                    self._directory = tempfile.mkdtemp(prefix=f"flowbus-soma-{self.name}-")
                    self._created_dir = True
                    made_here = True
            self._emit = emit
            self._tracker.seed(known)
            try:
                self._built = build(cfg, self._directory)
                self._phase = Phase.UP
                self._publish([self._ev(Connected, address=self.address, detail=self._detail())])
                left = self._in_progress()
                if left and cfg.recovery != "none":
                    self._kill_recorded()
                    self._recover_workflows(left, "left in progress by a previous incarnation")
                self._resync()
            except BackendError as exc:
                self._log.error("soma.session.start_failed", error=str(exc))
                self._teardown()
                self._phase = Phase.NEW
                self._emit = None
                self._forget_dir(made_here)
                raise
            except Exception as exc:
                self._log.error("soma.session.start_failed", error=repr(exc))
                self._teardown()
                self._phase = Phase.NEW
                self._emit = None
                self._forget_dir(made_here)
                raise BackendUnavailable(f"start: soma session {self.name!r}: {type(exc).__name__}: {exc}") from exc
            self._log.info("soma.session.started", address=self.address)

    def poll(self) -> float:
        """Observe once (diff, PID record, liveness); recover a dead controller when allowed."""
        with self._lock:
            if self._phase is Phase.UP:
                self._poll_up()
            elif self._phase is Phase.DOWN and self._backoff.ready():
                self._recover()
            if self._phase is Phase.UP:
                return self.config.poll_interval
            if self._phase is Phase.DOWN:
                return max(0.01, min(self.config.poll_interval, self._backoff.not_before - time.monotonic()))
            return _IDLE_S

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one operation (see the class docstring); results are plain data."""
        return dispatch(self, OPERATIONS, operation, *args, **kwargs)

    def operations(self) -> list[str]:
        return sorted(OPERATIONS)

    def stop(self) -> None:
        """Stop the workflows this controller runs (soma's kill, bounded by ``stop-timeout``),
        publish their last states and ``Disconnected``, end soma's threads and every job process,
        and remove the directory when the session created it."""
        with self._lock:
            if self._phase is Phase.CLOSED:
                return
            was_up = self._phase is Phase.UP
            if was_up:
                self._stop_workflows()
                with contextlib.suppress(BackendError):
                    self._scan(Observed.POLL)
            left = self._teardown()
            if left:
                self._log.warning("soma.threads.left", threads=left)
            if self._phase in (Phase.UP, Phase.DOWN):
                self._publish([self._ev(Disconnected, reason="stopped", will_retry=False)])
            self._phase = Phase.CLOSED
            self._remove_dir()
        self._log.info("soma.session.stopped")

    def release(self) -> None:
        """Let go of the controller for a newer incarnation: end soma's engine and scheduler
        threads in this process, publish nothing, and neither kill job processes nor delete or
        stop workflows; the directory and its PID record stay. The next session on the same
        directory kills the recorded job processes and brings the workflows back (``recovery``)."""
        with self._lock:
            if self._phase is Phase.CLOSED:
                return
            self._emit = None
            self._phase = Phase.CLOSED
            self._created_dir = False  # the next incarnation's directory now
            built, self._built = self._built, None
            left = built.shutdown(kill_jobs=False) if built is not None else []
        if left:
            self._log.warning("soma.threads.left", threads=left)
        self._log.info("soma.session.released", address=self.address)

    def kill(self) -> None:
        """Immediate: end soma's threads and job processes, and remove the directory when the
        session created it; never raises."""
        got = self._lock.acquire(timeout=1.0)
        try:
            self._teardown(timeout=1.0)
            self._phase = Phase.CLOSED
            if got:
                self._remove_dir()
        except Exception as exc:  # noqa: BLE001  (kill never raises, by contract)
            self._log.warning("soma.kill.failed", error=repr(exc))
        finally:
            if got:
                self._lock.release()

    # -- the operations' hooks ---------------------------------------------------------------------

    def _controller(self, operation: str) -> Any:
        with self._lock:
            if self._phase is not Phase.UP or self._built is None:
                raise BackendUnavailable(
                    f"{operation}: soma session {self.name!r} has no controller ({self._phase.value})")
            return self._built.controller

    def _is_current(self, wc: Any) -> bool:
        built = self._built
        return self._phase is Phase.UP and built is not None and built.controller is wc

    def _submitted(self, wf_id: int, soma_dict: dict[str, Any]) -> None:
        with self._lock:
            self._records[wf_id] = soma_dict
            self._seen[wf_id] = None

    def _deleted(self, wf_id: int) -> None:
        with self._lock:
            self._seen[wf_id] = None  # the next poll notices it is gone

    def _watch(self, wf_id: int) -> None:
        with self._lock:
            self._seen[wf_id] = None

    # -- observing ---------------------------------------------------------------------------------

    def _poll_up(self) -> None:
        assert self._built is not None
        reason = self._built.dead_reason()
        if reason:
            self._on_lost(reason)
            return
        try:
            self._scan(Observed.POLL)
            self._record_pids()
            self._fails = 0
        except BackendError as exc:
            self._fails += 1
            self._log.warning("soma.poll.failed", error=str(exc), fails=self._fails)
            if self._fails >= _FAILS_BEFORE_LOST:
                self._on_lost(f"the controller fails: {exc}")

    def _scan(self, observed: Observed, full: bool = False) -> tuple[int, int]:
        """Read what changed and publish the differences; returns (resources seen, events)."""
        assert self._built is not None
        wc = self._built.controller
        events: list[Any] = []
        seen_keys: set[str] = set()
        with soma_errors_to_flowbus("poll"):
            ids = [int(i) for i in wc.workflows()]
        for wf_id in [w for w in self._seen if w not in ids]:
            events += self._tracker.gone(self._tracker.keys_of(wf_id), observed, "workflow deleted")
            self._seen.pop(wf_id, None)
            self._names.pop(wf_id, None)
            self._records.pop(wf_id, None)
        for wf_id in ids:
            last = self._seen.get(wf_id)
            try:
                with soma_errors_to_flowbus("poll"):
                    if not full and last is not None and last.settled and wc.workflow_status(wf_id) == C.WORKFLOW_DONE:
                        seen_keys.update(last.resources)
                        continue
                    names = self._names.get(wf_id)
                    if names is None:
                        names = self._names[wf_id] = job_names(wc, wf_id)
                    snap = read_workflow(wc, wf_id, names)
            except BackendRejected:  # deleted between the listing and the read
                continue
            self._seen[wf_id] = snap
            seen_keys.update(snap.resources)
            seen_keys.update(snap.pending)
            events += self._tracker.diff(snap.resources, observed)
        if full:
            stale = [k for k in self._tracker.last if k not in seen_keys]
            events += self._tracker.gone(stale, observed, "not known to the soma-workflow controller")
        self._publish(events)
        return len(seen_keys), len(events)

    def _resync(self) -> None:
        self._seen = dict.fromkeys(self._seen)
        resources, changed = self._scan(Observed.RESYNC, full=True)
        self._publish([self._ev(Resynced, changed=changed, resources=resources)])

    def _record_pids(self) -> None:
        """Keep soma job id -> (pid, create time) of running jobs, on disk too (light mode)."""
        assert self._built is not None
        procs = self._built.job_procs()
        current = {jid: self._pids.get(jid) or (p.pid, create_time(p.pid)) for jid, p in procs.items()}
        if current != self._pids:
            self._pids = current
            if self.config.mode == "light":
                with contextlib.suppress(OSError):
                    save_pids(self._directory, current)

    def _in_progress(self) -> list[int]:
        assert self._built is not None
        wc = self._built.controller
        with soma_errors_to_flowbus("recovery"):
            return [int(w) for w in wc.workflows() if wc.workflow_status(int(w)) != C.WORKFLOW_DONE]

    # -- failure and recovery ----------------------------------------------------------------------

    def _on_lost(self, reason: str) -> None:
        retry = self.config.recovery != "none"
        self._log.warning("soma.controller.lost", reason=reason, recovery=self.config.recovery)
        self._publish([self._ev(Disconnected, reason=reason, will_retry=retry)])
        self._down_reason = reason
        self._attempt = 0
        self._fails = 0
        if not retry:
            self._phase = Phase.DEAD
            self._publish([self._ev(RecoveryGaveUp, attempts=0, reason=f"recovery = none: {reason}")])
            return
        self._phase = Phase.DOWN
        self._backoff.reset()  # first attempt at once

    def _recover(self) -> None:
        self._attempt += 1
        attempt = self._attempt
        try:
            killed = self._end_old()
            killed += self._kill_recorded()
            self._built = build(self.config, self._directory)
            self._phase = Phase.UP
            self._publish([
                self._ev(RecoveryAttempted, action="new_controller", attempt=attempt, reason=self._down_reason,
                         detail=f"killed job pids {killed}" if killed else "no job process was left"),
                self._ev(Connected, address=self.address, detail=self._detail()),
            ])
            left = self._in_progress()
            self._recover_workflows(left, self._down_reason)
            self._resync()
        except Exception as exc:  # noqa: BLE001  (any failure of soma here is a failed attempt)
            self._log.warning("soma.recovery.failed", attempt=attempt, error=repr(exc))
            if self._phase is Phase.UP:
                self._end_old()
            self._phase = Phase.DOWN
            self._publish([self._ev(RecoveryAttempted, action="new_controller", attempt=attempt,
                                    reason=self._down_reason, ok=False, detail=f"{type(exc).__name__}: {exc}")])
            limit = self.config.recovery_attempts
            if limit and attempt >= limit:
                self._publish([self._ev(RecoveryGaveUp, attempts=attempt, reason=str(exc))])
                self._phase = Phase.DEAD
            else:
                self._backoff.next()
            return
        self._log.info("soma.recovery.succeeded", attempt=attempt)
        self._attempt = 0
        self._backoff.reset()

    def _end_old(self) -> list[int]:
        """End the old controller: its job processes killed and reaped, its threads joined."""
        built, self._built = self._built, None
        if built is None:
            return []
        pids = sorted(p.pid for p in built.job_procs().values())
        left = built.shutdown()
        if left:
            self._log.warning("soma.threads.left", threads=left)
        return pids

    def _kill_recorded(self) -> list[int]:
        """Kill job processes the PID record names (a previous incarnation's), if still those."""
        recorded = dict(self._pids)
        if self.config.mode == "light":
            recorded.update(load_pids(self._directory))
        killed = [pid for pid, ctime in recorded.values() if kill_tree(pid, ctime)]
        self._pids = {}
        if self.config.mode == "light":
            with contextlib.suppress(OSError):
                save_pids(self._directory, {})
        return killed

    def _recover_workflows(self, wf_ids: list[int], reason: str) -> None:
        """Bring back each workflow left in progress, as ``recovery`` says."""
        assert self._built is not None
        wc, eng = self._built.controller, self._built.engine
        for wf_id in wf_ids:
            action = self.config.recovery
            try:
                if eng is None:
                    raise BackendRejected("needs the engine in this process (light mode or a local resource)")
                with soma_errors_to_flowbus(action):
                    if action == "reattach":
                        eng.engine_loop.force_stop(wf_id)  # marks the unfinished jobs failed, at once
                        wc.restart_workflow(wf_id)  # runs them (and what depends on them) again
                        detail = "force-stopped and restarted"
                        self._seen[wf_id] = None
                    else:
                        record = self._records.get(wf_id) or serialize(wc.workflow(wf_id))
                        eng._database_server.delete_workflow(wf_id)  # the new engine does not own it
                        new_id = int(wc.submit_workflow(from_record(record), name=record.get("name")))
                        self._records.pop(wf_id, None)
                        self._records[new_id] = record
                        self._seen[new_id] = None
                        detail = f"deleted and resubmitted as workflow {new_id}"
                        self._publish(self._tracker.gone(self._tracker.keys_of(wf_id), Observed.RESYNC,
                                                         f"deleted by recovery; resubmitted as workflow {new_id}"))
                        self._seen.pop(wf_id, None)
                        self._names.pop(wf_id, None)
                self._publish([self._ev(RecoveryAttempted, key=str(wf_id), action=action, reason=reason,
                                        detail=detail)])
            except BackendError as exc:
                self._log.warning("soma.workflow.recovery_failed", workflow_id=wf_id, error=str(exc))
                self._publish([self._ev(RecoveryAttempted, key=str(wf_id), action=action, reason=reason, ok=False,
                                        detail=str(exc)),
                               self._ev(RecoveryGaveUp, key=str(wf_id), attempts=1, reason=str(exc))])

    # -- stopping ----------------------------------------------------------------------------------

    def _stop_workflows(self) -> None:
        """Ask the engine to kill every workflow it runs (soma's stop_workflow, all at once) and
        wait up to ``stop-timeout`` for them to be done."""
        built = self._built
        if built is None or built.engine is None:
            return
        eng = built.engine
        with eng.engine_loop._lock:
            owned = list(eng.engine_loop._workflows)
        if not owned:
            return
        with contextlib.suppress(Exception):
            for wf_id in owned:
                eng._database_server.set_workflow_status(wf_id, C.KILL_PENDING)
        # done, and the exit information written (the engine writes it after the status)
        deadline = time.monotonic() + max(0.0, self.config.stop_timeout)
        wc = built.controller
        while time.monotonic() < deadline:
            try:
                if all(read_workflow(wc, w, {}).settled for w in owned):
                    break
            except Exception:  # noqa: BLE001  (a deleted workflow is not running)
                break
            threading.Event().wait(0.05)

    def _remove_dir(self) -> None:
        """Remove the temporary directory this session created (or took over from an earlier
        incarnation); a configured directory stays."""
        if self._created_dir:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._created_dir = False

    def _forget_dir(self, made_here: bool) -> None:
        """After a failed start: remove a temporary directory made by it (one taken over from an
        earlier incarnation stays for the next try)."""
        if made_here:
            self._remove_dir()
        self._created_dir = False

    def _teardown(self, timeout: float = 5.0) -> list[str]:
        built, self._built = self._built, None
        if built is None:
            return []
        return built.shutdown(timeout)

    # -- helpers -----------------------------------------------------------------------------------

    def _detail(self) -> str:
        return f"soma-workflow {_version()} {self.config.mode} mode"

    def _ev(self, cls: type[Any], **fields: Any) -> Any:
        return cls(source=self.name, backend=self.backend, **fields)

    def _publish(self, events: list[Any]) -> None:
        if self._emit is None:
            return
        for ev in events:
            self._emit(ev)


def _is_own_dir(path: str) -> bool:
    """A real directory (not a symlink) of this user that no one else may write in: safe to
    take over as soma's database and transfer directory."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


__all__ = ["SomaSession"]
