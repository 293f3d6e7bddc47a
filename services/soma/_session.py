"""The soma-workflow backend session: one ``WorkflowController`` observed by polling.

Observation: soma has no notifications. Each poll lists the controller's workflows and reads
``workflow_elements_status`` of every workflow that is not settled (done, with every job's exit
information written); settled ones cost one ``workflow_status``. Differences become
``StateChanged`` events (``observed=poll``; ``resync`` for the comparison with ``known`` at
start and after a recovery). Keys: ``<workflow id>`` and ``<workflow id>/<job name>``; states
and exit information as in :mod:`._wf`. File transfers are read too (``transfer/<id>`` for one
registered alone, ``<workflow id>/transfer/<id>`` for a workflow's; see :mod:`._transfers`), also
right after each transfer operation. The engine loop period (``engine-refresh``) bounds
how fast anything changes: polling faster gains nothing.

Lifecycle (:class:`~flowbus.services._session.SessionBase`): a controller that cannot be built
at :meth:`~SessionBase.start` (a directory that cannot be made, a bad resource, a dead server)
does not fail the start: the session opens DOWN with ``Disconnected`` (``will_retry``) and builds
it again on later polls, like after a loss. With ``recovery = none`` it never retries:
``Disconnected`` without retry and ``RecoveryGaveUp`` at once.

Liveness and recovery: the light-mode engine is three threads of this process. When one dies,
the engine loop is stopped, the controller's engine is gone, or three polls in a row fail, the
session publishes ``Disconnected`` and ends what is left of the old controller (threads joined,
its job processes killed by PID and reaped, so nothing runs twice). With backoff it then builds
a new controller on the same directory (``RecoveryAttempted`` ``reconnect``, ``Connected``,
``RecoveryAttempted`` ``new_controller`` naming the job processes killed), and per workflow
left in progress either force-stops and restarts it (``reattach``: the failed and unfinished
jobs run again) or deletes it and submits it again from the session's record (``resubmit``),
each with a ``RecoveryAttempted``; then the ``resync`` diff and ``Resynced``.
``RecoveryGaveUp`` after ``recovery-attempts`` failed attempts. Job PIDs are also written to
``flowbus-soma-pids.json`` in the directory, so a later incarnation (an actor restarted after a
crash, same directory) kills what the previous one left running before it recovers those
workflows the same way.

A database that stops answering (light mode: a process that holds it locked and is stopped or
hung): each poll and each open first reads it on a connection of its own (:mod:`._probe`); a read
that cannot start within ``probe-timeout`` names the session ``stuck`` (:meth:`SomaSession.stuck_for`,
listed by the actor's ``ping()``) and no soma call is made; stuck for ``request-timeout`` more is a
loss (``Disconnected``, then the recovery above once the database answers again).

Threads: :meth:`SomaSession.poll` runs on one worker thread, :meth:`SomaSession.call` may come
from any thread. Controller calls are not serialised (soma opens one sqlite connection per call),
so a ``wait_workflow`` does not stall polling; the lock guards the session's bookkeeping and the
controller swap during recovery. Every error a call raises names the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import soma_workflow.constants as C  # noqa: N812 - C.DONE, C.FAILED: constants, named like them
from soma_workflow.client import Helper

from flowbus.schemas import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    ErrorEvent,
    Event,
    Observed,
    RecoveryAttempted,
    RecoveryGaveUp,
    SomaSessionConfig,
)

from .._ops import Operations
from .._retention import Retired
from .._session import Opened, Phase, SessionBase
from ._engine import Built, build, create_time, kill_tree, load_pids, quiet, save_pids, soma_message
from ._logs import logs as _logs  # noqa: F401 - registers the logs operation on OPS
from ._ops import OPS, soma_errors_to_flowbus
from ._probe import DbProbe
from ._transfers import PREFIX as TRANSFER_PREFIX
from ._transfers import read_standalone, workflow_transfers
from ._wf import Tracker, WfSnap, from_record, has_files, job_names, read_workflow, serialize

#: polls that fail in a row before the controller counts as lost
_FAILS_BEFORE_LOST = 3
#: soma's database in a light-mode directory (``isolated_light_mode``)
DB_FILE = "soma-workflow.db"


def _version() -> str:
    try:
        from soma_workflow.info import __version__

        return str(__version__)
    except Exception:  # noqa: BLE001 - only a label: any failure reads as unknown
        return "?"


class SomaSession(SessionBase):
    """A session with one soma-workflow ``WorkflowController`` (implements ``BackendSession``).

    Operations (:meth:`call`): ``submit_workflow(workflow, expiration_date=None, name=None,
    queue=None) -> id`` (``workflow``: a flowbus ``WorkflowSpec`` dict/JSON or soma's JSON form),
    ``submit`` (also a JSON file's path), ``register_transfer``, ``workflow``, ``workflows``,
    ``jobs``, ``transfers``, ``job_ids``, ``workflow_status``, ``workflow_elements_status``,
    ``job_status``, ``job_termination_status``, ``transfer_status``, ``stop_workflow``,
    ``restart_workflow``, ``delete_workflow``, ``stop_jobs``, ``restart_jobs``,
    ``change_workflow_expiration_date`` (ISO text), ``wait_workflow``/``wait_job`` (bounded
    ``timeout``), ``transfer_files``, ``delete_transfer``, ``retrieve_job_stdouterr``, and the
    Helper functions ``list_failed_jobs``, ``delete_all_workflows``, ``transfer_input_files``,
    ``transfer_output_files``, ``serialize``.

    Errors (each naming the session and the operation; a soma error carries soma's type and
    message): ``BackendRejected`` (bad description, unknown workflow/job/transfer id, bad
    argument, a missing client file), ``UnknownOperation``, ``BackendUnavailable`` (the
    controller is down or being recovered; soma's engine or database failed).
    """

    backend = "soma"
    ops: ClassVar[Operations[Any]] = OPS

    def __init__(self, config: SomaSessionConfig) -> None:
        super().__init__(config, backoff_first=config.recovery_backoff,
                         reconnect_attempts=config.recovery_attempts)
        self.config: SomaSessionConfig = config
        self._tracker = Tracker(config.name, self.backend)
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
        #: workflows the session moves files for (``submit_workflow`` with ``transfer``) -> whether
        #: their output files are still to be copied back (once they are done)
        self._auto: dict[int, bool] = {}
        #: job pids the last loss killed (reported by the next ``new_controller``)
        self._killed: list[int] = []
        self._fails = 0
        #: light mode: the database's liveness probe (made once the directory is chosen)
        self._probe: DbProbe | None = None

    # -- introspection -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._directory if self.config.mode == "light" else f"resource:{self.config.resource_id or 'default'}"

    @property
    def controller(self) -> Any:
        """The current soma ``WorkflowController`` (None while down)."""
        return None if self._built is None else self._built.controller

    @property
    def engine_threads(self) -> tuple[threading.Thread, ...]:
        return () if self._built is None else self._built.threads

    def stuck_for(self) -> float | None:
        """Seconds soma's database has been stuck (locked by someone else), or None."""
        return self._probe.stuck_for() if self._probe is not None else None

    # -- hooks ---------------------------------------------------------------------------------------

    def _seed(self, known: Mapping[str, Event]) -> None:
        self._tracker.seed(known)

    def _open(self, observed: Observed) -> Opened:
        """Build the controller (light mode: on the session's directory, chosen on the first
        open), bring back the workflows left in progress (after a loss, or by a previous
        incarnation on the directory), and diff everything against what was published.

        Raises ``BackendUnavailable`` for any failure (the controller built is ended first)."""
        reconnect = self._phase is not Phase.NEW
        if self.config.mode == "light" and not self._directory:
            self._choose_directory()
            if self.config.probe_timeout > 0:
                self._probe = DbProbe(os.path.join(self._directory, DB_FILE), self.config.probe_timeout,
                                      self.config.request_timeout)
        if self._probe is not None and not self._probe.check():
            raise BackendTimeout(f"session {self.name!r}: the soma database {self._probe.path} is locked "
                                 f"(no read within {self.config.probe_timeout:g} s: stuck)")
        try:
            self._killed += self._end_old()
            if reconnect:  # what the lost controller (or an earlier incarnation) left running
                self._killed += self._kill_recorded()
            self._built = build(self.config, self._directory)
            left = self._in_progress()
            announce: list[Event] = []
            if reconnect:
                killed = sorted(set(self._killed))
                announce.append(self._ev(RecoveryAttempted, action="new_controller", attempt=self._attempt,
                                         reason=self._down_reason,
                                         detail=f"killed job pids {killed}" if killed else "no job process was left"))
                announce += self._recover_workflows(left, self._down_reason)
            elif left and self.config.recovery != "none":
                self._kill_recorded()
                announce += self._recover_workflows(left, "left in progress by a previous incarnation")
            self._seen = dict.fromkeys(self._seen)
            events, resources = self._scan(observed, full=True)
        except Exception as exc:
            self._end_old()
            if isinstance(exc, BackendUnavailable):
                raise
            raise BackendUnavailable(f"session {self.name!r}: cannot open the soma controller: "
                                     f"{soma_message(exc)}") from exc
        self._killed = []
        self._fails = 0
        return Opened(self.address, f"soma-workflow {_version()} {self.config.mode} mode", events, resources,
                      announce)

    def _observe(self) -> None:
        """Diff, PID record, liveness; three failed polls in a row are a loss."""
        assert self._built is not None
        if self._probe is not None and not self._probe.check():
            self._log.warning("soma.database.stuck", stuck_for=round(self._probe.stuck_for() or 0.0, 3))
            return  # no soma call to a locked database: it would wait for soma's own 15 s timeout
        reason = self._built.dead_reason()
        if reason:
            raise BackendUnavailable(reason)
        try:
            events, _ = self._scan(Observed.POLL)
        except BackendError as exc:
            self._fails += 1
            self._log.warning("soma.poll.failed", error=str(exc), fails=self._fails)
            if self._fails >= _FAILS_BEFORE_LOST:
                raise BackendUnavailable(f"the controller fails: {exc}") from exc
            return
        self._publish(events)
        self._record_pids()
        self._fails = 0

    def _drop(self) -> None:
        self._end_old()

    def _lost(self, reason: str) -> None:
        """End the old controller at once (its job processes killed, its threads joined)."""
        self._fails = 0
        self._killed = self._end_old()

    def _will_retry(self) -> bool:
        """``recovery = none`` makes a loss final (DEAD, ``Disconnected(will_retry=False)``)."""
        return self.config.recovery != "none"

    def _close(self, was_up: bool) -> None:
        """Stop the workflows this controller runs (soma's kill, bounded by ``stop-timeout``),
        publish their last states, end soma's threads and every job process, and remove the
        directory when the session created it."""
        if was_up:
            self._stop_workflows()
            with contextlib.suppress(BackendError):
                self._publish(self._scan(Observed.POLL)[0])
        self._end_old()
        self._remove_dir()

    def _let_go(self) -> None:
        """End soma's engine and scheduler threads in this process only: job processes run on,
        workflows and the directory (with its PID record) stay for the next incarnation, which
        kills the recorded job processes and brings the workflows back (``recovery``)."""
        self._created_dir = False  # the next incarnation's directory now
        built, self._built = self._built, None
        left = built.shutdown(kill_jobs=False) if built is not None else []
        if left:
            self._log.warning("soma.threads.left", threads=left)

    def _kill(self) -> None:
        """End soma's threads and job processes at once; remove the directory the session
        created unless a poll or call still holds the session."""
        built, self._built = self._built, None
        if built is not None:
            built.shutdown(timeout=1.0)
        if self._lock.acquire(blocking=False):  # the base may have gone ahead without the lock
            try:
                self._remove_dir()
            finally:
                self._lock.release()

    # -- the operations' helpers -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _using(self, operation: str) -> Iterator[Any]:
        """The controller, with soma's errors mapped at this edge. The lock is held only to take
        it (controller calls run in parallel); a call that fails because the controller died or
        was replaced meanwhile is ``BackendUnavailable``."""
        with self._lock:
            self._require_up(operation)
            assert self._built is not None
            wc = self._built.controller
        self._log.debug("soma.call.started", operation=operation)
        try:
            try:
                with soma_errors_to_flowbus(operation):
                    yield wc
            except (BackendRejected, BackendProtocolError) as exc:
                if not self._is_current(wc):
                    raise BackendUnavailable(
                        f"{operation}: the soma controller was lost during the call: {exc}") from exc
                raise
        except BackendError as exc:
            self._log.info("soma.call.failed", operation=operation, error=str(exc))
            raise
        self._log.debug("soma.call.complete", operation=operation)

    def _is_current(self, wc: Any) -> bool:
        built = self._built
        return self._phase is Phase.UP and built is not None and built.controller is wc

    def _submitted(self, wf_id: int, soma_dict: dict[str, Any], transfer: bool = False, outputs: bool = False) -> None:
        with self._lock:
            self._records[wf_id] = soma_dict
            self._seen[wf_id] = None
            if transfer:
                self._auto[wf_id] = outputs

    def _watch(self, wf_id: int) -> None:
        """Read ``wf_id`` again at the next poll (restarted, deleted: the poll notices it is gone)."""
        with self._lock:
            self._seen[wf_id] = None

    def _forget(self, retired: Sequence[Retired], in_backend: bool) -> None:
        """Retention, opted in (``forget-in-backend = true``): ``delete_workflow`` for each finished
        workflow, and drop it and its jobs from the session's memory. Without it the session
        keeps its own view (soma still lists the workflow; dropping it would publish it again)."""
        built = self._built
        if not in_backend or built is None or self._phase is not Phase.UP:
            return
        for r in retired:
            if not r.key.isdigit():
                continue  # a job or a transfer: it goes with its workflow
            wf_id = int(r.key)
            with soma_errors_to_flowbus("forget"):
                built.controller.delete_workflow(wf_id, True)
            for mem in (self._seen, self._names, self._records, self._auto):
                mem.pop(wf_id, None)
            for key in self._tracker.keys_of(wf_id):
                self._tracker.last.pop(key, None)

    # -- observing ---------------------------------------------------------------------------------

    def _scan(self, observed: Observed, full: bool = False) -> tuple[list[Event], int]:
        """Read what changed: the differences to publish and how many resources were seen."""
        assert self._built is not None
        wc = self._built.controller
        events: list[Event] = []
        seen_keys: set[str] = set()
        with soma_errors_to_flowbus("poll"):
            ids = [int(i) for i in wc.workflows()]
        for wf_id in [w for w in self._seen if w not in ids]:
            events += self._tracker.gone(self._tracker.keys_of(wf_id), observed, "workflow deleted")
            self._seen.pop(wf_id, None)
            self._names.pop(wf_id, None)
            self._records.pop(wf_id, None)
            self._auto.pop(wf_id, None)
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
                    if snap.settled and self._auto.get(wf_id):
                        snap = self._outputs_back(wc, wf_id, names, snap, events)
            except BackendRejected:  # deleted between the listing and the read
                continue
            # jobs, then files, then the workflow: its final state comes after its outputs are back
            own = snap.resources.pop(str(wf_id), None)
            snap.resources.update(workflow_transfers(wf_id, snap.transfers))
            if own is not None:
                snap.resources[str(wf_id)] = own
            self._seen[wf_id] = snap
            seen_keys.update(snap.resources)
            seen_keys.update(snap.pending)
            events += self._tracker.diff(snap.resources, observed)
        transfer_events, transfer_keys = self._scan_transfers(observed)
        events += transfer_events
        seen_keys.update(transfer_keys)
        if full:
            stale = [k for k in self._tracker.last if k not in seen_keys]
            events += self._tracker.gone(stale, observed, "not known to the soma-workflow controller")
        return events, len(seen_keys)

    def _outputs_back(self, wc: Any, wf_id: int, names: Mapping[int, str], snap: WfSnap,
                      events: list[Event]) -> WfSnap:
        """Copy a done workflow's output files back to their client paths (``submit_workflow``
        with ``transfer``), once. A failure is an ``ErrorEvent`` (key: the workflow; soma's
        message) and the files stay for ``transfer_output_files``. Returns the workflow read
        again."""
        self._auto[wf_id] = False
        try:
            with soma_errors_to_flowbus("transfer_output_files"), quiet():
                Helper.transfer_output_files(wf_id, wc)
        except BackendError as exc:
            self._log.warning("soma.outputs.failed", workflow_id=wf_id, error=str(exc))
            events.append(self._ev(ErrorEvent, key=str(wf_id), operation="transfer_output_files",
                                   observed=Observed.POLL, error_type=f"flowbus.schemas.{type(exc).__name__}",
                                   message=f"workflow {wf_id}: {exc}", args=[str(a) for a in exc.args]))
        return read_workflow(wc, wf_id, names)

    def _scan_transfers(self, observed: Observed) -> tuple[list[Event], set[str]]:
        """The transfers registered alone: what changed, and their keys (deleted ones go)."""
        assert self._built is not None
        with soma_errors_to_flowbus("poll"):
            snap = read_standalone(self._built.controller)
        gone = [k for k in self._tracker.last if k.startswith(TRANSFER_PREFIX) and k not in snap]
        events: list[Event] = [*self._tracker.gone(gone, observed, "transfer deleted"),
                               *self._tracker.diff(snap, observed)]
        return events, set(snap)

    def _transfers_changed(self, reread: Iterable[int] | None = ()) -> None:
        """After a transfer operation: publish the new states of the transfers registered alone
        now (not at the next poll), and read the workflows ``reread`` (None: all) again at the
        next poll."""
        with self._lock:
            for wf_id in list(self._seen) if reread is None else reread:
                if wf_id in self._seen:
                    self._seen[wf_id] = None
            if self._phase is not Phase.UP or self._built is None:
                return
            try:
                events, _ = self._scan_transfers(Observed.POLL)
            except BackendError as exc:  # the next poll tries again
                self._log.warning("soma.transfers.read_failed", error=str(exc))
                return
            self._publish(events)

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

    def _recover_workflows(self, wf_ids: list[int], reason: str) -> list[Event]:
        """Bring back each workflow left in progress, as ``recovery`` says; returns the events
        that tell how (published right after ``Connected``)."""
        assert self._built is not None
        events: list[Event] = []
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
                        rebuilt = from_record(record)
                        new_id = int(wc.submit_workflow(rebuilt, name=record.get("name")))
                        if self._auto.pop(wf_id, None) is not None:  # submitted with transfer: so is this one
                            inputs, self._auto[new_id] = has_files(rebuilt)
                            if inputs:
                                Helper.transfer_input_files(new_id, wc)
                        self._records.pop(wf_id, None)
                        self._records[new_id] = record
                        self._seen[new_id] = None
                        detail = f"deleted and resubmitted as workflow {new_id}"
                        events += self._tracker.gone(self._tracker.keys_of(wf_id), Observed.RESYNC,
                                                     f"deleted by recovery; resubmitted as workflow {new_id}")
                        self._seen.pop(wf_id, None)
                        self._names.pop(wf_id, None)
                events.append(self._ev(RecoveryAttempted, key=str(wf_id), action=action, reason=reason,
                                       detail=detail))
            except BackendError as exc:
                self._log.warning("soma.workflow.recovery_failed", workflow_id=wf_id, error=str(exc))
                events += [self._ev(RecoveryAttempted, key=str(wf_id), action=action, reason=reason, ok=False,
                                    detail=str(exc)),
                           self._ev(RecoveryGaveUp, key=str(wf_id), attempts=1, reason=str(exc))]
        return events

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

    def _choose_directory(self) -> None:
        """The directory is ``directory`` from the config, else the previous incarnation's
        (``previous_address``), else a fresh temporary one (removed when the session ends)."""
        cfg, previous = self.config, self._previous_address
        if cfg.directory:
            self._directory = os.path.abspath(os.path.expanduser(cfg.directory))
        elif previous and _is_own_dir(previous):
            self._directory = previous
            # a temporary directory an earlier incarnation created is still ours to remove
            self._created_dir = os.path.basename(previous).startswith(f"flowbus-soma-{self.name}-") \
                and os.path.dirname(previous) == tempfile.gettempdir()
        else:
            self._directory = tempfile.mkdtemp(prefix=f"flowbus-soma-{self.name}-")
            self._created_dir = True


def _is_own_dir(path: str) -> bool:
    """A real directory (not a symlink) of this user that no one else may write in: safe to
    take over as soma's database and transfer directory."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


__all__ = ["SomaSession"]
