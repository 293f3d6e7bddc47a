"""The QCG-PilotJob backend session: a manager it starts on 127.0.0.1 (mode ``local``), or a
running manager (mode ``connect``).

Observation: QCG's status publisher through our own SUB socket (``observed=push``), reconciled
with ``list()``/``info()`` after every (re)connect (``resync``) and every ``reconcile_interval``
(``poll``); see :mod:`._jobs` for what counts as a change.

Liveness: a probe of its own (:mod:`._probe`) asks the manager's status every
``liveness_interval`` seconds and declares it lost when a reply takes longer than
``liveness_timeout``; a request of the session's that hangs on that manager is cut short by the
verdict. A dead or frozen (e.g. SIGSTOPped) manager is so published as ``Disconnected`` within
``liveness_interval + liveness_timeout`` plus one poll (50 ms), 1.65 s with the defaults, in both
modes. A manager process this session started (or adopted locally, by pid) is also checked at
every poll, so its death is seen within about 50 ms. With the probe off (``liveness_interval``
0), a manager seen only over the network is lost at its first failed reconciliation, a local one
that is alive but does not answer after three failed reconciliations in a row.

Recovery (``recovery``): ``none`` makes the loss final (``Disconnected(will_retry=False)``, the
unfinished jobs of a manager of ours ``LOST``); ``restart`` starts a new manager (mode ``local``;
mode ``connect`` reconnects) with backoff, publishing ``RecoveryAttempted`` per attempt and
``RecoveryGaveUp`` after ``recovery_attempts``; ``resubmit`` also submits the unfinished jobs
again to the new manager. A manager that cannot be started or reached at :meth:`start` leaves
the session down and retried the same way; ``start`` itself fails only for a ``wd`` that cannot
be made or a config no manager accepts.

Threads: :meth:`QcgSession.poll` runs on one worker thread; :meth:`QcgSession.call` may come
from any thread. QCG's client is not thread-safe, so the session lock serialises every use of it
and of the session's bookkeeping (which also orders ``queued`` before any published state).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

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
)

from .._base import map_errors
from .._ops import Operations
from .._retention import Retired
from .._session import IDLE_S, Opened, Phase, SessionBase
from . import _forms as forms
from ._client import QCG_ERRORS, ManagerGone, kill_pids
from ._jobs import FINAL_NATIVE, JobBook, split_key
from ._link import Client, Link, Liveness, host_is_loopback, kill_link, open_local, open_remote
from ._logs import logs as _logs  # noqa: F401 - registers the logs operation on OPS
from ._observe import drain, reconcile, snapshot
from ._ops import OPS
from ._specs import STATE_DIR, WorkDir

#: how long a manager of ours may take to end after ``finish`` before it is terminated
_FINISH_GRACE_S = 0.5

#: seconds between two polls while up (the publisher is drained that often)
_POLL_S = 0.05
#: seconds stop() waits for cancelled jobs to end before finishing the manager
_CANCEL_WAIT_S = 5.0
#: consecutive failed reconciliations before a live-looking local manager is declared hung
_HUNG_AFTER = 3

#: sessions that started their manager (see :func:`_kill_at_exit`)
_OWNERS: weakref.WeakSet[QcgSession] = weakref.WeakSet()


@atexit.register
def _kill_at_exit() -> None:
    """A normal interpreter exit without stop() ends the managers this process started (and
    their jobs). A crash runs no atexit hook: the manager survives for the restarted actor."""
    for session in list(_OWNERS):
        session.kill()


class QcgSession(SessionBase):
    """A session with one QCG-PilotJob manager (implements ``BackendSession``).

    Operations (:meth:`call`, see :mod:`._ops`): ``submit(jobs: list[dict]) -> list[str]`` (each
    dict the keyword set of ``qcg.pilotjob.api.job.Jobs.add`` or QCG's own job JSON as
    ``Jobs.add_std`` takes it; an ``after`` naming no job of the batch or the manager is refused
    before anything is submitted), ``list()``, ``status(names)``, ``info(names, **params)``,
    ``info_parsed(names, **params)``, ``remove(names) -> dict`` (publishes ``REMOVED``),
    ``cancel(names) -> dict``, ``resubmit(name) -> list[str]`` (remove a finished job and submit
    it again from the spec this session submitted it with), ``resources()``, ``system_status()``,
    ``finish()`` (mode ``connect`` only: a manager the session owns ends with ``stop()``),
    ``wait4(names, timeout=None)``, ``wait4all(timeout=None)``,
    ``wait4_any_job_finish(timeout=None) -> [key, state]``. ``names`` is a str or a list.

    Errors: ``BackendRejected`` (the manager refused; its message is in the text),
    ``BackendTimeout`` (no reply within ``request_timeout``), ``BackendUnavailable`` (no manager,
    it died, or recovery is under way), ``UnknownOperation``.
    """

    backend = "qcg"
    ops: ClassVar[Operations[Any]] = OPS
    #: QCG keeps every job until it is removed: retention removes them (``removeJob``)
    forget_in_backend_default: ClassVar[bool] = True

    def __init__(self, config: QcgSessionConfig) -> None:
        super().__init__(config, backoff_first=config.recovery_backoff, reconnect_attempts=config.recovery_attempts)
        self.config: QcgSessionConfig = config
        #: notified whenever job states or the phase change (``wait4``/``wait4all`` wait on it)
        self._changed = threading.Condition(self._lock)
        self._book = JobBook(config.name)
        self._wd = WorkDir(config.name, config.wd)
        self._link: Link | None = None
        #: the current link is a previous incarnation's manager, adopted by address
        self._adopted = False
        #: the instance id the last incarnation's ``Connected`` named (checked when adopting)
        self._hint_id = ""
        #: the instance of the last manager this session was attached to ("" before the first)
        self._last_instance = ""
        #: the lost manager, kept (closed) until recovery succeeds or gives up
        self._down_link: Link | None = None
        self._next_reconcile = 0.0
        self._failures = 0

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

    # -- hooks: connecting -------------------------------------------------------------------------

    def _seed(self, known: Mapping[str, Event]) -> None:
        """The bus's last states; a ``Connected`` among them names the previous incarnation's
        manager (adopted first, with its jobs, when ``previous_address`` was not given)."""
        self._book.seed(known)
        for ev in known.values():
            if isinstance(ev, Connected) and ev.address:
                self._previous_address = self._previous_address or ev.address
                self._hint_id = ev.detail

    def _open(self, observed: Observed) -> Opened:
        """Until the first success, adopt the previous incarnation's manager if it still answers;
        otherwise start a manager (mode ``local``) or connect to ``address``. Then the resync
        diff. A manager this open started is killed again if the diff cannot be read."""
        cfg = self.config
        if cfg.mode == "connect" and not cfg.address:
            raise BackendRejected("connect: mode 'connect' needs an address")
        try:
            wd = self._wd.prepare()
        except OSError as exc:
            raise BackendRejected(f"wd {cfg.wd or '(temporary)'!r} cannot be made: {exc}") from exc
        first = not self._last_instance
        link = self._adopt(self._previous_address, self._hint_id) if first and self._previous_address else None
        adopted = link is not None
        if link is None:
            if cfg.mode == "local":
                link = open_local(wd, cfg.nodes, cfg.request_timeout, self._liveness())
                _OWNERS.add(self)
            else:
                link = open_remote(cfg.address, wd, cfg.request_timeout, owned=False, liveness=self._liveness())
        try:
            if first:
                self._load_specs(link, adopted)
            self._book.new_manager()
            with map_errors(QCG_ERRORS, "resync"):
                snap = snapshot(link.client)
        except BaseException:
            if link.proc is not None:
                kill_link(link)
            link.close()
            raise
        self._link, self._adopted, self._failures = link, adopted, 0
        events = self._book.diff(snap, observed, f"not known to QCG manager {link.instance_id}")
        if first:  # keep only the loaded specs of jobs still known (to the bus or the manager)
            stale = [n for n in self._book.specs if n not in self._book.last]
            for name in stale:
                del self._book.specs[name]
            if stale:
                self._save_specs()
        return Opened(link.address, link.instance_id, events, len(snap.obs))

    def _opened(self) -> None:
        """After the resync: with recovery ``resubmit``, a fresh manager standing in for a dead
        one (after a loss, or at the start of mode ``local`` when the previous one is gone) gets
        every unfinished job submitted again."""
        link = self._link
        assert link is not None
        previous, self._last_instance = self._last_instance, link.instance_id
        link.track()
        self._next_reconcile = time.monotonic() + self.config.reconcile_interval
        self._down_link = None
        if self.config.recovery == "resubmit":
            if previous and link.instance_id != previous:
                self._resubmit(link, self._attempt, self._down_reason)
            elif not previous and not self._adopted and self.config.mode == "local":
                where = f" at {self._previous_address}" if self._previous_address else ""
                self._resubmit(link, max(1, self._attempt), f"the previous QCG manager{where} is gone")
        self._wake()

    def _liveness(self) -> Liveness:
        return Liveness(self.config.liveness_interval, self.config.liveness_timeout)

    def _adopt(self, address: str, expected_id: str) -> Link | None:
        """A previous incarnation's manager at ``address``, if it still answers."""
        local = self.config.mode == "local"
        if local and not host_is_loopback(address):
            self._log.warning("qcg.manager.adopt_refused", address=address, reason="not loopback")
            return None
        try:
            link = open_remote(address, self._wd.prepare(), self.config.request_timeout, owned=local,
                               liveness=self._liveness())
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
        """Mode ``local``: load the spec file of an adopted manager's ``Wd`` when it carries our
        state directory, else of this session's wd (mode ``connect``: a manager we did not
        start, whose wd is not ours to write in, keeps specs in memory only)."""
        if self.config.mode != "local":
            return
        try:
            specs = self._wd.load(self._manager_wd(link) if adopted else None)
        except OSError as exc:
            raise BackendRejected(f"spec directory {STATE_DIR!r} cannot be made: {exc}") from exc
        self._book.record(specs.values())

    def _manager_wd(self, link: Link) -> Path | None:
        try:
            with map_errors(QCG_ERRORS, "system_status"):
                wd = Path(str(link.client.system_status()["System"]["Wd"]))
        except (BackendError, KeyError, TypeError) as exc:
            self._log.warning("qcg.manager.wd_unknown", address=link.address, error=str(exc))
            return None
        return wd if (wd / STATE_DIR).is_dir() else None

    # -- hooks: observing --------------------------------------------------------------------------

    def _observe(self) -> None:
        """Drain the publisher, reconcile when due; raise ``BackendUnavailable`` when the manager
        died or stopped answering."""
        link = self._link
        assert link is not None
        reason = link.death()
        if reason:
            raise BackendUnavailable(reason)
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
                raise BackendUnavailable(f"manager not answering: {exc}") from exc
        except BackendError as exc:
            self._log.warning("qcg.poll.failed", error=str(exc))
            self._next_reconcile = time.monotonic() + self.config.reconcile_interval

    def _poll_interval(self) -> float:
        if self._phase is not Phase.UP:
            return IDLE_S
        return max(0.0, min(_POLL_S, self._next_reconcile - time.monotonic()))

    def _reconcile(self, link: Link) -> None:
        self._tell(reconcile(self._book, link))
        self._next_reconcile = time.monotonic() + self.config.reconcile_interval

    def _drain(self, link: Link) -> None:
        self._tell(drain(self._book, link, self._log))

    # -- hooks: losing and recovering --------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        """Reap a dead (or SIGKILL a hung or frozen) manager of ours, and kill its orphaned jobs."""
        link, self._link = self._link, None
        if link is None:
            return
        self._log.warning("qcg.manager.died", reason=reason, address=link.address, instance=link.instance_id)
        if link.owned:
            link.stop_service(0.0, hard=True)
            self._log.warning("qcg.orphans.killed", pids=kill_pids(link.orphans()))
        link.close()
        self._down_link = link
        self._wake()

    def _will_retry(self) -> bool:
        """Recovery ``none`` makes a loss final; the others reconnect as the base does."""
        return self.config.recovery != "none"

    def _recovery(self) -> tuple[str, str]:
        """Mode ``local`` restarts the manager in its work dir; ``connect`` reconnects."""
        if self.config.mode == "local":
            return "restart-manager", str(self._wd.path)
        return "reconnect", self.config.address

    def _gave_up(self) -> None:
        """Lost for good: the job processes of a manager of ours were killed with it."""
        link, self._down_link = self._down_link, None
        if link is not None and link.owned:
            self._tell(self._book.lost(self._book.unfinished(), Observed.RESYNC,
                                       f"QCG manager {link.instance_id} died: {self._down_reason}"))
        self._wake()

    def _resubmit(self, link: Link, attempt: int, reason: str) -> None:
        specs = self._book.resubmission()
        if not specs:
            return
        names = [str(s["name"]) for s in specs]
        try:
            with map_errors(QCG_ERRORS, "resubmit"):
                self._submit(link.client, specs, recovery=(attempt, reason))
        except BackendError as exc:
            self._log.error("qcg.jobs.resubmit_failed", jobs=names, error=str(exc))
            self._publish([self._ev(RecoveryAttempted, key=n, action="resubmit", attempt=attempt, ok=False,
                                    reason=reason, detail=str(exc)) for n in names])
            return
        self._log.info("qcg.jobs.resubmitted", jobs=names)

    # -- hooks: ending -----------------------------------------------------------------------------

    def _drop(self) -> None:
        """After a failed open: a start refused for good (still NEW) leaves no directory behind;
        an adopted manager's wd stays (that manager runs on)."""
        link, self._link = self._link, None
        if link is not None:
            link.close()
        if self._phase is Phase.NEW:
            self._wd.remove(inherited=False)

    def _close(self, was_up: bool) -> None:
        """Cancel unfinished jobs and finish the manager when the session owns it, then release
        every socket, process and temporary directory of ours."""
        _OWNERS.discard(self)
        link, self._link, self._down_link = self._link, None, None
        if link is not None:
            if link.owned and was_up:
                self._shutdown(link)
            link.close()
        self._wake()
        self._wd.remove()

    def _let_go(self) -> None:
        """Close our sockets and QCG's client only: the manager and its jobs run on for the next
        incarnation, which adopts them by address; a manager this process started is no longer
        ended at interpreter exit, and no working directory is removed (the manager writes there)."""
        _OWNERS.discard(self)
        link, self._link, self._down_link = self._link, None, None
        self._wd.keep()
        self._wake()
        if link is not None:
            link.close()
            self._log.info("qcg.session.released", address=link.address, instance=link.instance_id)

    def _kill(self) -> None:
        """SIGKILL the manager we own and its jobs. The link is closed and the wd removed only
        when no poll or call still uses them (the base may run this without the lock)."""
        _OWNERS.discard(self)
        link = self._link
        if link is not None and link.owned:
            self._log.warning("qcg.session.killed", jobs_killed=kill_link(link))
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._link, self._down_link = None, None
            if link is not None:
                link.close()
            self._changed.notify_all()
            self._wd.remove()
        finally:
            self._lock.release()

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
        # QCG's finish idles 2 s, then 1 s more closing its loop; with every job ended and the
        # session's own work dir, nothing is lost by ending the manager after a short grace
        link.stop_service(_FINISH_GRACE_S)
        killed = kill_pids(leftovers)
        self._wd.drop_specs()
        self._log.info("qcg.manager.finished", address=link.address, stragglers_killed=killed)

    @staticmethod
    def _unfinished(client: Client) -> list[str]:
        return [n for n, d in client.list().items() if d.get("status") not in FINAL_NATIVE]

    # -- helpers for the operations ----------------------------------------------------------------

    @contextlib.contextmanager
    def _using(self, operation: str) -> Iterator[Client]:
        """The current client, under the lock, with QCG errors mapped at this edge."""
        with self._lock:
            self._require_up(operation)
            link = self._link
            assert link is not None
            self._log.debug("qcg.call.started", operation=operation)
            try:
                with map_errors(QCG_ERRORS, operation):
                    reason = link.death()
                    if reason:
                        raise ManagerGone(reason)
                    yield link.client
            except BackendError as exc:
                self._log.warning("qcg.call.failed", operation=operation, error=str(exc))
                raise
            self._log.debug("qcg.call.complete", operation=operation)

    def _submit(self, client: Client, specs: list[dict[str, Any]],
                recovery: tuple[int, str] | None = None) -> list[str]:
        """Submit ``specs`` in one request; record them and publish ``queued`` before returning
        (QCG never publishes QUEUED). A recovery resubmission (``(attempt, reason)``) announces
        each job first."""
        batch = Jobs()
        for spec in specs:
            forms.add(batch, spec)
        submitted = [str(n) for n in client.submit(batch)]
        self._book.record(specs)
        self._save_specs()
        if recovery is not None:
            attempt, reason = recovery
            self._publish([self._ev(RecoveryAttempted, key=n, action="resubmit", attempt=attempt, reason=reason,
                                    detail=f"resubmitted to {self.instance_id}") for n in submitted])
        self._tell(self._book.submitted(submitted))
        return submitted

    def _finish(self, link: Link) -> None:
        """``finish`` of a manager the session does not own: it ends, and the session with it."""
        self._shutdown(link)
        link.close()
        self._link = None
        self._down_reason = "the QCG manager was finished by the finish operation"
        self._publish([self._ev(Disconnected, reason="finished", will_retry=False)])
        self._phase = Phase.DEAD
        self._wake()

    def _forget(self, retired: Sequence[Retired], in_backend: bool) -> None:
        """Retention: ``removeJob`` for the finished jobs among them (never an unfinished one,
        nor an iteration: its job is removed with all of them), then drop them from the book."""
        keys = [r.key for r in retired]
        jobs = [k for k in keys if split_key(k)[1] is None and self._book.is_final(k)
                and self._book.last[k].native in FINAL_NATIVE]
        try:
            if in_backend and jobs and self._phase is Phase.UP:
                with self._using("forget") as client:
                    reply = client.send_request({"request": "removeJob", "jobNames": jobs})
                refused = dict((reply.get("data") or {}).get("errors") or {})
                if refused:
                    self._log.warning("qcg.forget.refused", jobs=len(refused),
                                      example=next(iter(refused.items())))
        finally:
            self._book.drop(keys)
            self._save_specs()

    def _save_specs(self) -> None:
        self._wd.save(self._book.specs)

    def _tell(self, events: Sequence[Event]) -> None:
        """Publish job events and wake the waiters of ``wait4``/``wait4all``."""
        self._publish(events)
        if events:
            self._changed.notify_all()

    def _wake(self) -> None:
        self._changed.notify_all()


__all__ = ["QcgSession"]
