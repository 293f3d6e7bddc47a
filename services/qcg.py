"""The QCG-PilotJob backend session: a manager it starts on 127.0.0.1, or a running manager.

Observation: QCG's status publisher through our own SUB socket (``observed=push``), reconciled
with ``list()``/``info()`` after every (re)connect (``resync``) and every ``reconcile_interval``
(``poll``). Liveness: the service process (local) or a bounded request (remote). Recovery after
the manager dies: report only, restart it, or restart it and resubmit every unfinished job.

Threads: :meth:`QcgSession.poll` runs on one worker thread; :meth:`QcgSession.call` may come
from any thread. QCG's client is not thread-safe, so one lock serialises every use of it and of
the session's bookkeeping (which also orders ``queued`` before any published state).
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from qcg.pilotjob.api.job import Jobs

from flowbus.schemas import (
    BackendError,
    BackendRejected,
    BackendUnavailable,
    Connected,
    Disconnected,
    Event,
    Observed,
    QcgSessionConfig,
    RecoveryAttempted,
    RecoveryGaveUp,
    Resynced,
    StateChanged,
)

from ._base import Backoff, Emit, dispatch, map_errors
from ._qcg_client import QCG_ERRORS, kill_pids
from ._qcg_jobs import FINAL_NATIVE, JobBook, Obs, Snapshot, key_of, obs_from_info, obs_from_list
from ._qcg_link import Client, Link, host_is_loopback, kill_link, open_local, open_remote
from ._qcg_ops import OPERATIONS, Phase, QcgOperations
from ._qcg_specs import STATE_DIR, load_specs, remove_specs, save_specs, specs_path

_POLL_S = 0.05
_IDLE_S = 0.5
#: seconds stop() waits for cancelled jobs to end before finishing the manager
_CANCEL_WAIT_S = 5.0
#: consecutive failed reconciliations before a live-looking local manager is declared hung
_HUNG_AFTER = 3

#: in ``<wd>/.flowbus/``: the wd is a temporary directory a session made (not a configured
#: ``wd``); whichever session ends the manager working there removes it (see _inheritable)
_TEMP_MARKER = "temporary"

#: sessions that started their manager (see :func:`_kill_at_exit`)
_OWNERS: weakref.WeakSet[QcgSession] = weakref.WeakSet()


@atexit.register
def _kill_at_exit() -> None:
    """A normal interpreter exit without stop() ends the managers this process started (and
    their jobs). A crash runs no atexit hook: the manager survives for the restarted actor."""
    for session in list(_OWNERS):
        session.kill()


class QcgSession(QcgOperations):
    """A session with one QCG-PilotJob manager (implements ``BackendSession``).

    Operations (:meth:`call`): ``submit(jobs: list[dict]) -> list[str]`` (each dict is the keyword
    set of ``qcg.pilotjob.api.job.Jobs.add``), ``list()``, ``status(names)``,
    ``info(names, **params)``, ``info_parsed(names, **params)``, ``remove(names) -> dict``,
    ``cancel(names) -> dict``, ``resubmit(name) -> list[str]`` (remove a finished job and submit
    it again from the spec this session submitted it with), ``resources()``, ``system_status()``,
    ``finish()``, ``wait4(names, timeout=None)``, ``wait4all(timeout=None)``. ``names`` is a str
    or a list.

    Errors: ``BackendRejected`` (the manager refused; its message is in the text),
    ``BackendTimeout`` (no reply within ``request_timeout``), ``BackendUnavailable`` (no manager,
    it died, or recovery is under way), ``UnknownOperation``.
    """

    backend = "qcg"

    def __init__(self, config: QcgSessionConfig) -> None:
        self.config = config
        self.name = config.name
        self._log = structlog.get_logger("flowbus.qcg").bind(backend="qcg", session_id=config.name)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._book = JobBook(config.name)
        self._phase = Phase.NEW
        self._emit: Emit | None = None
        self._link: Link | None = None
        self._dir: Path | None = None
        self._own_dir = False
        #: an adopted manager's temporary wd (made by an earlier incarnation): ours to remove
        #: once we end that manager, handed on again by release()
        self._inherited_dir: Path | None = None
        #: where the submitted specs are kept (mode "local" only): beside the manager's wd
        self._specs_file: Path | None = None
        self._next_reconcile = 0.0
        self._failures = 0
        self._attempt = 0
        self._down_reason = ""
        self._down_link: Link | None = None
        self._last_instance = ""
        self._backoff = Backoff(first=config.recovery_backoff, cap=max(30.0, config.recovery_backoff))

    # -- introspection -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The current manager's REQ address ("" while disconnected)."""
        link = self._link
        return link.address if link else ""

    @property
    def instance_id(self) -> str:
        link = self._link
        return link.instance_id if link else ""

    @property
    def service_pid(self) -> int | None:
        """The pid of the manager's service process when it runs on this host and we know it."""
        link = self._link
        return link.service_pid if link else None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, emit: Emit, known: Mapping[str, Event], *, previous_address: str | None = None) -> None:
        """Reach a manager, publish ``Connected`` and the ``resync`` differences to ``known``.

        First tries ``previous_address`` (or the address of a ``Connected`` found in ``known``):
        a manager left running by a previous incarnation is adopted with its jobs. Otherwise starts
        a manager on 127.0.0.1 (mode ``local``, see ``_qcg_service``) or connects to ``config.address``.
        Mode ``local`` loads the job specs a previous incarnation saved beside the manager's working
        directory; a fresh manager standing in for a dead one gets the unfinished ones resubmitted
        (recovery ``resubmit``).
        Raises ``BackendUnavailable``/``BackendTimeout`` when no manager can be reached.
        """
        with self._lock:
            if self._phase is not Phase.NEW:
                raise BackendRejected(f"start: session {self.name!r} was already started")
            self._emit = emit
            self._book.seed(known)
            hint_id = ""
            for ev in known.values():
                if isinstance(ev, Connected) and ev.address:
                    previous_address = previous_address or ev.address
                    hint_id = ev.detail
            self._dir = self._prepare_dir()
            link: Link | None = None
            try:
                if previous_address:
                    link = self._adopt(previous_address, hint_id)
                adopted = link is not None
                if link is None:
                    link = self._open()
                    if self.config.mode == "local":
                        _OWNERS.add(self)
                self._load_specs(link, adopted)
                self._attach(link)
                self._after_start(link, adopted, previous_address)
            except BaseException as exc:
                self._log.error("qcg.session.start_failed", error=str(exc))
                if link is not None:
                    if self._link is link:  # Connected was published
                        self._publish([self._ev(Disconnected, reason=f"start failed: {exc}", will_retry=False)])
                    if link.proc is not None:
                        kill_link(link)
                    link.close()
                self._link = None
                self._phase = Phase.NEW
                self._emit = None
                self._specs_file = None
                self._inherited_dir = None  # an adopted manager was not ended: its wd stays
                self._remove_dir()
                raise

    def poll(self) -> float:
        """Drain publisher events, reconcile when due, check liveness, drive recovery."""
        with self._lock:
            if self._phase is Phase.UP and self._link is not None:
                self._poll_up(self._link)
            if self._phase is Phase.DOWN and self._backoff.ready():
                self._recover()
            if self._phase is Phase.UP:
                return max(0.0, min(_POLL_S, self._next_reconcile - time.monotonic()))
            if self._phase is Phase.DOWN:
                return max(0.01, min(_IDLE_S, self._backoff.not_before - time.monotonic()))
            return _IDLE_S

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run one operation (see the class docstring); results are plain, picklable data."""
        return dispatch(self, OPERATIONS, operation, *args, **kwargs)

    def operations(self) -> list[str]:
        return sorted(OPERATIONS)

    def stop(self) -> None:
        """Cancel unfinished jobs, finish the manager we own, release every process and file."""
        with self._lock:
            if self._phase is Phase.CLOSED:
                return
            link, was_up = self._link, self._phase is Phase.UP
            if link is not None:
                if link.owned and was_up:
                    self._shutdown(link)
                link.close()
            self._link = None
            self._phase = Phase.CLOSED
            if was_up:
                self._publish([self._ev(Disconnected, reason="stopped", will_retry=False)])
            self._changed.notify_all()
        self._remove_dir()
        self._log.info("qcg.session.stopped")

    def release(self) -> None:
        """Let go of the manager for a newer incarnation, which adopts it by address: close our
        sockets and QCG's client, publish nothing, and neither finish the manager nor touch its
        jobs. A manager this process started is no longer ended at interpreter exit, and its
        working directory stays (the manager still writes there)."""
        with self._lock:
            if self._phase is Phase.CLOSED:
                return
            _OWNERS.discard(self)
            link, self._link, self._down_link = self._link, None, None
            self._emit = None
            self._phase = Phase.CLOSED
            self._own_dir = False  # the manager's --wd: never removed by this session now
            self._inherited_dir = None  # nor the one it adopted: the next incarnation's now
            self._changed.notify_all()
        if link is not None:
            link.close()
        self._log.info("qcg.session.released", address=link.address if link else "",
                       instance=link.instance_id if link else "")

    def kill(self) -> None:
        """Immediate, best effort: SIGKILL the manager we own and its jobs; never raises."""
        got = self._lock.acquire(timeout=1.0)
        try:
            link = self._link
            if link is not None and link.owned:
                killed = kill_link(link)
                self._log.warning("qcg.session.killed", jobs_killed=killed)
            if got:
                if link is not None:
                    link.close()
                self._link = None
                self._phase = Phase.CLOSED
                self._changed.notify_all()
                self._remove_dir()
        except Exception as exc:  # noqa: BLE001 - kill never raises, by contract
            self._log.warning("qcg.kill.failed", error=repr(exc))
        finally:
            if got:
                self._lock.release()

    # -- connecting --------------------------------------------------------------------------------

    def _prepare_dir(self) -> Path:
        """The configured ``wd`` (kept), else a temporary directory (0700) that this session
        removes when it stops or is killed, marked so that a session adopting its manager
        after a move or a crash removes it in turn (see :meth:`_inheritable`)."""
        if self.config.wd:
            path = Path(self.config.wd).expanduser()
            path.mkdir(parents=True, exist_ok=True)
            self._own_dir = False
            return path
        path = Path(tempfile.mkdtemp(prefix=f"flowbus-qcg-{self.name}-"))
        self._own_dir = True
        try:
            (path / STATE_DIR).mkdir(mode=0o700)
            (path / STATE_DIR / _TEMP_MARKER).write_text(f"made by flowbus session {self.name!r}; "
                                                         f"removed when its QCG manager is ended\n")
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            self._own_dir = False
            raise
        return path

    def _inheritable(self, wd: Path) -> bool:
        """``wd`` is a temporary wd an earlier session of this user made for this session name:
        a real directory of ours holding our marker (no one else can make that file)."""
        try:
            d, marker = os.lstat(wd), os.lstat(wd / STATE_DIR / _TEMP_MARKER)
        except OSError:
            return False
        return (stat.S_ISDIR(d.st_mode) and stat.S_ISREG(marker.st_mode) and d.st_uid == marker.st_uid == os.getuid()
                and wd.name.startswith(f"flowbus-qcg-{self.name}-"))

    def _remove_dir(self) -> None:
        """Remove this session's temporary wd, and an adopted one whose manager is now ended."""
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._own_dir = False
        inherited, self._inherited_dir = self._inherited_dir, None
        if inherited is not None:
            shutil.rmtree(inherited, ignore_errors=True)
            self._log.info("qcg.wd.removed", wd=str(inherited), made_by="an earlier incarnation")

    def _open(self) -> Link:
        assert self._dir is not None
        timeout = self.config.request_timeout
        if self.config.mode == "local":
            return open_local(self._dir, self.config.nodes, timeout)
        return open_remote(self.config.address, self._dir, timeout, owned=False)

    def _adopt(self, address: str, expected_id: str) -> Link | None:
        """A previous incarnation's manager at ``address``, if it still answers."""
        assert self._dir is not None
        local = self.config.mode == "local"
        if local and not host_is_loopback(address):
            self._log.warning("qcg.manager.adopt_refused", address=address, reason="not loopback")
            return None
        try:
            link = open_remote(address, self._dir, self.config.request_timeout, owned=local)
        except BackendError as exc:
            self._log.info("qcg.manager.adopt_failed", address=address, error=str(exc))
            return None
        if expected_id and link.instance_id != expected_id:
            self._log.warning("qcg.manager.adopt_refused", address=address, instance=link.instance_id,
                              expected=expected_id)
            link.close()
            return None
        self._log.info("qcg.manager.adopted", address=address, instance=link.instance_id, pid=link.service_pid)
        return link

    def _load_specs(self, link: Link, adopted: bool) -> None:
        """Mode ``local``: find the spec file (an adopted manager's ``Wd`` when it carries our
        state directory, else this session's directory) and load what it holds."""
        if self.config.mode != "local":
            return  # a manager we did not start: its wd is not ours to write in
        assert self._dir is not None
        wd = (self._manager_wd(link) if adopted else None) or self._dir
        if wd != self._dir and self._inheritable(wd):
            self._inherited_dir = wd
        (wd / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self._specs_file = specs_path(wd)
        self._book.record(load_specs(self._specs_file, self.name).values())

    def _manager_wd(self, link: Link) -> Path | None:
        try:
            with map_errors(QCG_ERRORS, "system_status"):
                wd = Path(str(link.client.system_status()["System"]["Wd"]))
        except (BackendError, KeyError, TypeError) as exc:
            self._log.warning("qcg.manager.wd_unknown", address=link.address, error=str(exc))
            return None
        return wd if (wd / STATE_DIR).is_dir() else None

    def _after_start(self, link: Link, adopted: bool, previous_address: str | None) -> None:
        """Keep only the loaded specs of jobs still known (to the bus or the manager); a fresh
        manager in place of a dead one gets the unfinished ones resubmitted."""
        book = self._book
        stale = [n for n in book.specs if n not in book.last]
        for name in stale:
            del book.specs[name]
        if stale:
            self._save_specs()
        if not adopted and self.config.mode == "local" and self.config.recovery == "resubmit" and book.specs:
            gone = f" at {previous_address}" if previous_address else ""
            self._down_reason = f"the previous QCG manager{gone} is gone"
            self._resubmit(link, 1)

    def _save_specs(self) -> None:
        if self._specs_file is not None:
            save_specs(self._specs_file, self.name, self._book.specs)

    def _attach(self, link: Link) -> None:
        """Make ``link`` current: ``Connected``, then the resync diff, then ``Resynced``."""
        self._link = link
        self._phase = Phase.UP
        self._failures = 0
        self._book.new_manager()
        self._publish([self._ev(Connected, address=link.address, detail=link.instance_id)])
        with map_errors(QCG_ERRORS, "resync"):
            snap = self._snapshot(link.client)
        events = self._book.diff(snap, Observed.RESYNC, f"not known to QCG manager {link.instance_id}")
        self._publish(events)
        self._publish([self._ev(Resynced, changed=len(events), resources=len(snap.obs))])
        self._last_instance = link.instance_id
        link.track()
        self._next_reconcile = time.monotonic() + self.config.reconcile_interval

    # -- observing ---------------------------------------------------------------------------------

    def _poll_up(self, link: Link) -> None:
        reason = link.death()
        if reason:
            self._on_death(link, reason)
            return
        try:
            with map_errors(QCG_ERRORS, "poll"):
                self._drain(link)
                if time.monotonic() >= self._next_reconcile:
                    self._reconcile(link)
            self._failures = 0
        except BackendUnavailable as exc:
            self._failures += 1
            self._log.warning("qcg.poll.failed", error=str(exc), failures=self._failures)
            if link.proc is None or self._failures >= _HUNG_AFTER:
                self._on_death(link, f"manager not answering: {exc}")
        except BackendError as exc:
            self._log.warning("qcg.poll.failed", error=str(exc))
            self._next_reconcile = time.monotonic() + self.config.reconcile_interval

    @staticmethod
    def _snapshot(client: Client) -> Snapshot:
        """Everything the manager holds: ``list()`` plus ``info(withChilds)`` of every job."""
        jobs = client.list()
        snap = Snapshot(parents=set(jobs), obs=obs_from_list(jobs))
        if jobs:
            snap.obs.update(obs_from_info(client.info(sorted(jobs), withChilds=True)))
        return snap

    def _reconcile(self, link: Link) -> None:
        book = self._book
        jobs = link.client.list()
        listed = obs_from_list(jobs)
        detail = []
        for name, obs in listed.items():
            seen = book.last.get(name)
            changed = seen is None or seen.native != obs.native
            if (name in book.iterative and (changed or obs.native not in FINAL_NATIVE)) or (
                    changed and obs.native == "FAILED"):
                detail.append(name)
        snap = Snapshot(parents=set(jobs), obs=listed)
        if detail:
            snap.obs.update(obs_from_info(link.client.info(detail, withChilds=True)))
        self._publish(book.diff(snap, Observed.POLL, f"no longer known to QCG manager {link.instance_id}"))
        book.suspect.difference_update(n for n in list(book.suspect) if book.is_final(n))
        link.track()
        self._next_reconcile = time.monotonic() + self.config.reconcile_interval

    def _drain(self, link: Link) -> None:
        if link.sub is None:
            return
        book, iid = self._book, link.instance_id
        items: list[tuple[str, str, str]] = []  # (key, job, native)
        for topic, data in link.sub.drain():
            job, native, it = data.get("job"), data.get("state"), data.get("it")
            if topic == "NOJ" or data.get("manager") != iid or not isinstance(job, str) or not isinstance(native, str):
                continue
            if job in book.removed:
                continue  # late news about a job removed from the manager
            items.append((key_of(job, it if isinstance(it, int) else None), job, native))
        if not items:
            return
        # a reused name: the old job's final events may still be in flight, so a final state is
        # believed only once the manager confirms it (earlier states cannot end the job wrongly)
        verify = {job for _, job, native in items if job in book.suspect and native in FINAL_NATIVE}
        failed = {job for key, job, native in items if native == "FAILED" and not book.is_final(key)}
        details: dict[str, Obs] = {}
        if verify or failed:
            try:
                details = obs_from_info(link.client.info(sorted(verify | failed), withChilds=True))
            except BackendRejected as exc:  # a job vanished meanwhile; reconciliation will tell
                self._log.info("qcg.event.detail_failed", error=str(exc))
        events: list[StateChanged] = []
        executing = False
        for key, job, native in items:
            if job in verify and native in FINAL_NATIVE:
                continue
            got = details.get(key)
            ev = book.change(key, got if got is not None and got.native == native else Obs(native), Observed.PUSH)
            if ev is not None:
                events.append(ev)
            executing = executing or native == "EXECUTING"
        for job in verify:
            for key, obs in details.items():
                if book.parent_of.get(key, key) == job or key == job:
                    ev = book.change(key, obs, Observed.POLL)
                    if ev is not None:
                        events.append(ev)
            if book.is_final(job):
                book.suspect.discard(job)
        self._publish(events)
        if executing:
            link.track()

    # -- failure and recovery ----------------------------------------------------------------------

    def _on_death(self, link: Link, reason: str) -> None:
        recovery = self.config.recovery
        self._log.warning("qcg.manager.died", reason=reason, address=link.address, instance=link.instance_id)
        self._publish([self._ev(Disconnected, reason=reason, will_retry=recovery != "none")])
        self._link = None
        if link.owned:
            link.stop_service(0.0)  # reap it, or make a hung one dead
            killed = kill_pids(link.orphans())
            self._log.warning("qcg.orphans.killed", pids=killed)
        link.close()
        self._down_reason = reason
        self._attempt = 0
        self._backoff.reset()
        if recovery == "none":
            self._give_up(link)
        else:
            self._phase = Phase.DOWN
            self._down_link = link

    def _give_up(self, link: Link | None) -> None:
        self._phase = Phase.DEAD
        self._link = None
        if link is not None and link.owned:  # its job processes were killed: they are gone
            self._publish(self._book.lost(self._book.unfinished(), Observed.RESYNC,
                                          f"QCG manager {link.instance_id} died: {self._down_reason}"))
        self._changed.notify_all()

    def _recover(self) -> None:
        cfg = self.config
        self._attempt += 1
        attempt = self._attempt
        action = "restart-manager" if cfg.mode == "local" else "reconnect"
        previous = self._last_instance
        link: Link | None = None
        try:
            link = self._open()
            self._log.info("qcg.recovery.attempted", action=action, attempt=attempt, ok=True, address=link.address)
            self._publish([self._ev(RecoveryAttempted, action=action, attempt=attempt, reason=self._down_reason,
                                    detail=link.address)])
            self._attach(link)
        except BackendError as exc:
            self._log.warning("qcg.recovery.attempted", action=action, attempt=attempt, ok=False, error=str(exc))
            if link is not None:
                self._drop_half_attached(link, str(exc))
            self._publish([self._ev(RecoveryAttempted, action=action, attempt=attempt, reason=self._down_reason,
                                    ok=False, detail=str(exc))])
            if attempt >= cfg.recovery_attempts:
                self._log.error("qcg.recovery.gave_up", attempts=attempt)
                self._publish([self._ev(RecoveryGaveUp, attempts=attempt, reason=str(exc))])
                self._give_up(self._down_link)
            else:
                self._backoff.next()
            return
        self._down_link = None
        self._backoff.reset()
        if cfg.recovery == "resubmit" and link.instance_id != previous:
            self._resubmit(link, attempt)

    def _drop_half_attached(self, link: Link, reason: str) -> None:
        """Undo a connect whose resync failed (a manager we started is killed)."""
        if self._phase is Phase.UP:
            self._publish([self._ev(Disconnected, reason=f"resync failed: {reason}", will_retry=True)])
        self._phase = Phase.DOWN
        self._link = None
        if link.proc is not None:
            kill_link(link)
        link.close()

    def _resubmit(self, link: Link, attempt: int) -> None:
        specs = self._book.resubmission()
        if not specs:
            return
        names = [str(s["name"]) for s in specs]
        try:
            with map_errors(QCG_ERRORS, "resubmit"):
                self._submit(link.client, specs, recovery_attempt=attempt)
        except BackendError as exc:
            self._log.error("qcg.jobs.resubmit_failed", jobs=names, error=str(exc))
            self._publish([self._ev(RecoveryAttempted, key=n, action="resubmit", attempt=attempt, ok=False,
                                    reason=self._down_reason, detail=str(exc)) for n in names])
            return
        self._log.info("qcg.jobs.resubmitted", jobs=names)

    def _shutdown(self, link: Link) -> None:
        """Cancel what runs, wait briefly, finish the manager, make sure nothing is left."""
        try:
            with map_errors(QCG_ERRORS, "stop"):
                pending = self._unfinished(link.client)
                if pending:
                    link.client.send_request({"request": "cancelJob", "jobNames": pending})
                deadline = time.monotonic() + _CANCEL_WAIT_S
                while pending and time.monotonic() < deadline:
                    if link.sub is not None:
                        link.sub.wait(0.1)
                        self._drain(link)
                    else:
                        time.sleep(0.1)
                    pending = self._unfinished(link.client)
                self._reconcile(link)
        except BackendError as exc:
            self._log.warning("qcg.stop.cancel_failed", error=str(exc))
        leftovers = link.orphans() if link.owned else {}
        try:
            with map_errors(QCG_ERRORS, "finish"):
                link.client._send_finish()
        except BackendError as exc:
            self._log.warning("qcg.manager.finish_failed", error=str(exc))
        link.stop_service(10.0)
        killed = kill_pids(leftovers)
        if self._specs_file is not None:  # its jobs ended with it: nothing left to resubmit
            remove_specs(self._specs_file)
        self._log.info("qcg.manager.finished", address=link.address, stragglers_killed=killed)

    @staticmethod
    def _unfinished(client: Client) -> list[str]:
        return [n for n, d in client.list().items() if d.get("status") not in FINAL_NATIVE]

    # -- helpers -----------------------------------------------------------------------------------

    def _ev(self, cls: type[Any], **fields: Any) -> Any:
        return cls(source=self.name, backend=self.backend, **fields)

    def _publish(self, events: list[Any]) -> None:
        if self._emit is None:
            return
        for ev in events:
            self._emit(ev)
        if events:
            self._changed.notify_all()

    def _submit(self, client: Client, specs: list[dict[str, Any]], recovery_attempt: int = 0) -> list[str]:
        """Submit ``specs`` in one request; record them and publish ``queued`` before returning
        (QCG never publishes QUEUED). A recovery resubmission announces each job first."""
        batch = Jobs()
        for spec in specs:
            batch.add(**spec)
        submitted = [str(n) for n in client.submit(batch)]
        self._book.record(specs)
        self._save_specs()
        if recovery_attempt:
            self._publish([self._ev(RecoveryAttempted, key=n, action="resubmit", attempt=recovery_attempt,
                                    reason=self._down_reason, detail=f"resubmitted to {self.instance_id}")
                           for n in submitted])
        self._publish(self._book.submitted(submitted))
        return submitted


__all__ = ["QcgSession"]
