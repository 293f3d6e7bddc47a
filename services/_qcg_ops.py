"""The operations a :class:`~flowbus.services.qcg.QcgSession` runs through ``call()``.

Every use of QCG's client goes through :meth:`QcgOperations._using`: under the session lock (the
client is one REQ socket and not thread-safe), with QCG errors mapped at this edge.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

from qcg.pilotjob.api.jobinfo import JobInfo

from flowbus.schemas import BackendError, BackendRejected, BackendTimeout, BackendUnavailable, Disconnected

from ._base import map_errors
from ._qcg_client import QCG_ERRORS, ManagerGone
from ._qcg_jobs import JobBook
from ._qcg_link import Client, Link

#: operation name -> method (see :func:`flowbus.services.dispatch`)
OPERATIONS: Mapping[str, str] = {
    "cancel": "_op_cancel",
    "finish": "_op_finish",
    "info": "_op_info",
    "info_parsed": "_op_info_parsed",
    "list": "_op_list",
    "remove": "_op_remove",
    "resources": "_op_resources",
    "resubmit": "_op_resubmit",
    "status": "_op_status",
    "submit": "_op_submit",
    "system_status": "_op_system_status",
    "wait4": "_op_wait4",
    "wait4all": "_op_wait4all",
}


class Phase(enum.Enum):
    NEW = "new"
    UP = "up"
    DOWN = "down"  # lost, recovery pending
    DEAD = "dead"  # lost for good (recovery "none", or gave up)
    FINISHED = "finished"  # finish() was called
    CLOSED = "closed"


def _names(names: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(names, str):
        return [names]
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    raise BackendRejected(f"job names must be a str or a list of str, not {type(names).__name__}")


def _jobinfo(info: JobInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, value in vars(info).items():
        if isinstance(value, timedelta):
            out[attr] = value.total_seconds()
        elif attr == "childs" and value is not None:
            out[attr] = [_jobinfo(child) for child in value]
        else:
            out[attr] = value
    return out


class QcgOperations:
    """Mixin: the ``call()`` operations. The session provides the state and the helpers below."""

    name: str
    _lock: threading.RLock
    _changed: threading.Condition
    _link: Link | None
    _phase: Phase
    _book: JobBook
    _log: Any

    def _submit(self, client: Client, specs: list[dict[str, Any]], recovery_attempt: int = 0) -> list[str]:
        raise NotImplementedError

    def _shutdown(self, link: Link) -> None:
        raise NotImplementedError

    def _save_specs(self) -> None:
        raise NotImplementedError

    def _publish(self, events: list[Any]) -> None:
        raise NotImplementedError

    def _ev(self, cls: type[Any], **fields: Any) -> Any:
        raise NotImplementedError

    @contextlib.contextmanager
    def _using(self, operation: str) -> Iterator[Client]:
        """The current client, under the lock, with QCG errors mapped at this edge."""
        with self._lock:
            link = self._link
            if self._phase is not Phase.UP or link is None:
                raise BackendUnavailable(f"{operation}: session {self.name!r} has no QCG manager "
                                         f"({self._phase.value})")
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

    def _op_submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        if not isinstance(jobs, (list, tuple)) or not all(isinstance(j, Mapping) for j in jobs):
            raise BackendRejected("submit: expects a list of job dicts (Jobs.add keywords)")
        specs = [dict(j) for j in jobs]
        names = [s.get("name") for s in specs]
        if not all(isinstance(n, str) and n and ":" not in n for n in names) or len(set(names)) != len(names):
            raise BackendRejected(f"submit: every job needs a unique 'name' without ':' (got {names})")
        with self._using("submit") as client:
            return self._submit(client, specs)

    def _op_remove(self, names: str | list[str]) -> dict[str, Any]:
        """Remove finished jobs so their names can be reused. Returns the manager's reply,
        ``{'removed': n, 'errors': {name: message}}`` (QCG's own client drops the errors)."""
        job_names = _names(names)
        with self._using("remove") as client:
            reply = client.send_request({"request": "removeJob", "jobNames": job_names})
            data = dict(reply.get("data") or {})
            refused = data.get("errors") or {}
            self._book.forget([n for n in job_names if n not in refused])
            self._save_specs()
        return data

    def _op_resubmit(self, name: str) -> list[str]:
        """Remove the finished job ``name`` and submit it again from the spec this session
        submitted it with (``after`` on jobs that succeeded dropped); ``queued`` is published
        before it returns. Jobs this session (or, mode ``local``, a previous incarnation with the
        same manager working directory) submitted have a spec: any other name (a job another
        client submitted) is ``BackendRejected``, as is a job the manager refuses to remove."""
        if not isinstance(name, str) or not name or ":" in name:
            raise BackendRejected(f"resubmit: expects one job name (a str without ':'), not {name!r}")
        with self._using("resubmit") as client:
            if name not in self._book.specs:
                raise BackendRejected(
                    f"resubmit: the spec of job {name!r} is unknown to session {self.name!r}: only jobs "
                    "this session submitted can be resubmitted (not jobs another client submitted, nor, "
                    "in mode 'connect', jobs submitted before the session was restarted or moved)")
            spec = self._book.respec(name)
            reply = client.send_request({"request": "removeJob", "jobNames": [name]})
            refused = (dict(reply.get("data") or {}).get("errors") or {}).get(name)
            if refused:
                raise BackendRejected(f"resubmit: the QCG manager refused to remove job {name!r}: {refused}")
            kept = self._book.specs[name]
            self._book.forget([name])
            try:
                return self._submit(client, [spec])
            except BaseException:
                self._book.specs[name] = kept  # removed but not submitted: resubmit can be tried again
                raise

    def _op_cancel(self, names: str | list[str]) -> dict[str, Any]:
        """Cancel queued or running jobs (or one iteration, ``"job:3"``). Returns the manager's
        reply, ``{'canceled': n, 'errors': {name: message}}``."""
        job_names = _names(names)
        with self._using("cancel") as client:
            reply = client.send_request({"request": "cancelJob", "jobNames": job_names})
        return dict(reply.get("data") or {})

    def _op_list(self) -> dict[str, Any]:
        with self._using("list") as client:
            return dict(client.list())

    def _op_status(self, names: str | list[str]) -> dict[str, Any]:
        job_names = _names(names)
        with self._using("status") as client:
            return dict(client.status(job_names))

    def _op_info(self, names: str | list[str], **params: Any) -> dict[str, Any]:
        job_names = _names(names)
        with self._using("info") as client:
            return dict(client.info(job_names, **params))

    def _op_info_parsed(self, names: str | list[str], **params: Any) -> dict[str, dict[str, Any]]:
        job_names = _names(names)
        with self._using("info_parsed") as client:
            return {name: _jobinfo(ji) for name, ji in client.info_parsed(job_names, **params).items()}

    def _op_resources(self) -> dict[str, Any]:
        with self._using("resources") as client:
            return dict(client.resources())

    def _op_system_status(self) -> dict[str, Any]:
        with self._using("system_status") as client:
            return dict(client.system_status())

    def _op_finish(self) -> None:
        """Cancel unfinished jobs and finish the manager (also one we did not start)."""
        with self._using("finish"):
            link = self._link
            assert link is not None
            self._shutdown(link)
            link.close()
            self._link = None
            self._phase = Phase.FINISHED
            self._publish([self._ev(Disconnected, reason="finished", will_retry=False)])

    def _op_wait4(self, names: str | list[str], timeout: float | None = None) -> dict[str, str]:
        """Wait until every named job is final, from the session's own view (not QCG's wait4,
        which can return on stale events). Returns name -> QCG state."""
        job_names = _names(names)
        with self._changed:
            unknown = [n for n in job_names if n not in self._book.last]
            if unknown:
                raise BackendRejected(f"wait4: unknown jobs {unknown}")
            return self._wait(job_names, timeout, "wait4")

    def _op_wait4all(self, timeout: float | None = None) -> dict[str, str]:
        with self._changed:
            names = [n for n in self._book.seen if n not in self._book.removed]
            return self._wait(names, timeout, "wait4all")

    def _wait(self, names: list[str], timeout: float | None, operation: str) -> dict[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pending = [n for n in names if not self._book.is_final(n)]
            if not pending:
                return {n: self._book.last[n].native for n in names}
            if self._phase in (Phase.DEAD, Phase.FINISHED, Phase.CLOSED):
                raise BackendUnavailable(f"{operation}: session {self.name!r} is {self._phase.value}")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise BackendTimeout(f"{operation}: {len(pending)} jobs not finished after {timeout:g} s: "
                                     f"{pending[:5]}")
            self._changed.wait(remaining)


__all__ = ["OPERATIONS", "Phase", "QcgOperations"]
