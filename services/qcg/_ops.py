"""The operations a :class:`~flowbus.services.qcg.QcgSession` runs through ``call()``: one
function per operation, named as the operation, declared with ``@OPS.op``.

Every use of QCG's client goes through the session's ``_using``: under the session lock (the
client is one REQ socket and not thread-safe), with QCG errors mapped at this edge.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from qcg.pilotjob.api.jobinfo import JobInfo

from flowbus.schemas import BackendRejected, BackendTimeout, BackendUnavailable

from .._ops import Operations
from . import _forms as forms
from ._jobs import REMOVED

if TYPE_CHECKING:
    from ._link import Client
    from ._session import QcgSession

OPS: Operations[QcgSession] = Operations("qcg")


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


# -- jobs ------------------------------------------------------------------------------------------

@OPS.op
def submit(session: QcgSession, jobs: list[dict[str, Any]]) -> list[str]:
    """Submit ``jobs`` in one request, each in either form :mod:`._forms` describes (the
    keyword set of ``Jobs.add``, or QCG's own job JSON as ``Jobs.add_std`` takes it); ``queued``
    is published before it returns. An ``after`` naming a job that is neither in the batch nor
    held by the manager is refused (``BackendRejected`` naming it) and nothing is submitted."""
    if not isinstance(jobs, (list, tuple)) or not all(isinstance(j, Mapping) for j in jobs):
        raise BackendRejected("submit: expects a list of job dicts (Jobs.add keywords or QCG job JSON)")
    specs = [dict(j) for j in jobs]
    names = [s.get("name") for s in specs]
    if not all(isinstance(n, str) and n and ":" not in n for n in names) or len(set(names)) != len(names):
        raise BackendRejected(f"submit: every job needs a unique 'name' without ':' (got {names})")
    for spec in specs:
        why = forms.problem(spec)
        if why:
            raise BackendRejected(f"submit: job {spec['name']!r}: {why}")
    with session._using("submit") as client:
        _check_after(session, client, specs)
        return session._submit(client, specs)


def _check_after(session: QcgSession, client: Client, specs: list[dict[str, Any]]) -> None:
    """Refuse ``after`` entries naming a job neither in ``specs`` nor held by the manager (QCG
    would take the batch and leave the dependant ``OMITTED``). Jobs the session saw on this
    manager count without asking; for the others the manager's list is read once."""
    book = session._book
    batch = {str(s["name"]) for s in specs}
    wanted = {(str(s["name"]), dep) for s in specs for dep in forms.deps(s)
              if forms.dep_job(dep) not in batch}
    unsure = {forms.dep_job(dep) for _, dep in wanted} - (book.seen - book.removed)
    if not unsure:
        return
    held = set(client.list())
    missing = [(job, dep) for job, dep in sorted(wanted) if forms.dep_job(dep) in unsure - held]
    if missing:
        named = ", ".join(f"{dep!r} (after of job {job!r})" for job, dep in missing)
        raise BackendRejected(f"submit: {named}: no such job in this batch nor in QCG manager "
                              f"{session.instance_id}; nothing was submitted")


@OPS.op
def remove(session: QcgSession, names: str | list[str]) -> dict[str, Any]:
    """Remove finished jobs so their names can be reused. Returns the manager's reply,
    ``{'removed': n, 'errors': {name: message}}`` (QCG's own client drops the errors). Each
    job removed (and each of its iterations) is published as ``unknown``/``REMOVED``."""
    job_names = _names(names)
    with session._using("remove") as client:
        reply = client.send_request({"request": "removeJob", "jobNames": job_names})
        data = dict(reply.get("data") or {})
        refused = data.get("errors") or {}
        gone = [n for n in job_names if n not in refused]
        session._book.forget(gone)
        session._save_specs()
        session._tell(session._book.removal(gone, f"removed from QCG manager {session.instance_id}"))
    return data


@OPS.op
def resubmit(session: QcgSession, name: str) -> list[str]:
    """Remove the finished job ``name`` and submit it again from the spec this session
    submitted it with (``after`` on jobs that succeeded dropped); ``queued`` is published
    before it returns. Jobs this session (or, mode ``local``, a previous incarnation with the
    same manager working directory) submitted have a spec: any other name (a job another
    client submitted) is ``BackendRejected``, as is a job the manager refuses to remove."""
    if not isinstance(name, str) or not name or ":" in name:
        raise BackendRejected(f"resubmit: expects one job name (a str without ':'), not {name!r}")
    book = session._book
    with session._using("resubmit") as client:
        if name not in book.specs:
            raise BackendRejected(
                f"resubmit: the spec of job {name!r} is unknown to session {session.name!r}: only jobs "
                "this session submitted can be resubmitted (not jobs another client submitted, nor, "
                "in mode 'connect', jobs submitted before the session was restarted or moved)")
        spec = book.respec(name)
        reply = client.send_request({"request": "removeJob", "jobNames": [name]})
        refused = (dict(reply.get("data") or {}).get("errors") or {}).get(name)
        if refused:
            raise BackendRejected(f"resubmit: the QCG manager refused to remove job {name!r}: {refused}")
        kept = book.specs[name]
        book.forget([name])
        try:
            return session._submit(client, [spec])
        except BaseException:
            book.specs[name] = kept  # removed but not submitted: resubmit can be tried again
            raise


@OPS.op
def cancel(session: QcgSession, names: str | list[str]) -> dict[str, Any]:
    """Cancel queued or running jobs (or one iteration, ``"job:3"``). Returns the manager's
    reply, ``{'canceled': n, 'errors': {name: message}}``."""
    job_names = _names(names)
    with session._using("cancel") as client:
        reply = client.send_request({"request": "cancelJob", "jobNames": job_names})
    return dict(reply.get("data") or {})


# -- queries ---------------------------------------------------------------------------------------

@OPS.named("list")  # a function named list would hide the builtin in this module
def list_(session: QcgSession) -> dict[str, Any]:
    with session._using("list") as client:
        return dict(client.list())


@OPS.op
def status(session: QcgSession, names: str | list[str]) -> dict[str, Any]:
    job_names = _names(names)
    with session._using("status") as client:
        return dict(client.status(job_names))


@OPS.op
def info(session: QcgSession, names: str | list[str], **params: Any) -> dict[str, Any]:
    job_names = _names(names)
    with session._using("info") as client:
        return dict(client.info(job_names, **params))


@OPS.op
def info_parsed(session: QcgSession, names: str | list[str], **params: Any) -> dict[str, dict[str, Any]]:
    """``info`` as QCG's ``JobInfo`` objects, converted to plain dicts (durations in seconds)."""
    job_names = _names(names)
    with session._using("info_parsed") as client:
        return {name: _jobinfo(ji) for name, ji in client.info_parsed(job_names, **params).items()}


@OPS.op
def resources(session: QcgSession) -> dict[str, Any]:
    with session._using("resources") as client:
        return dict(client.resources())


@OPS.op
def system_status(session: QcgSession) -> dict[str, Any]:
    with session._using("system_status") as client:
        return dict(client.system_status())


# -- the manager -----------------------------------------------------------------------------------

@OPS.op
def finish(session: QcgSession) -> None:
    """Cancel unfinished jobs and finish a manager the session connected to (mode ``connect``);
    the session ends with it (``Disconnected(reason="finished", will_retry=False)``). Refused for
    a manager the session owns (mode ``local``): ending it is what ``stop()`` does."""
    with session._using("finish"):
        link = session._link
        assert link is not None
        if link.owned:
            raise BackendRejected(
                f"finish: refused on session {session.name!r}: it would end the QCG manager this session "
                "started and observes (its recovery would only start another); stop the session instead, "
                "which cancels the jobs and finishes the manager")
        session._finish(link)


# -- waiting ---------------------------------------------------------------------------------------

@OPS.op
def wait4(session: QcgSession, names: str | list[str], timeout: float | None = None) -> dict[str, str]:
    """Wait until every named job is final, from the session's own view (not QCG's wait4,
    which can return on stale events). Returns name -> QCG state (``REMOVED`` for a job
    removed meanwhile)."""
    job_names = _names(names)
    with session._changed:
        unknown = [n for n in job_names if n not in session._book.last]
        if unknown:
            raise BackendRejected(f"wait4: unknown jobs {unknown}")
        return _wait(session, job_names, timeout, "wait4")


@OPS.op
def wait4all(session: QcgSession, timeout: float | None = None) -> dict[str, str]:
    """:func:`wait4` of every job the current manager holds or held."""
    with session._changed:
        names = [n for n in session._book.seen if n not in session._book.removed]
        return _wait(session, names, timeout, "wait4all")


@OPS.op
def wait4_any_job_finish(session: QcgSession, timeout: float | None = None) -> list[str]:
    """Wait until a job or an iteration finishes after this call (QCG's own returns at once on
    a stale event of a job long finished) and return ``[key, QCG state]``, e.g.
    ``["a", "SUCCEED"]`` or ``["it:2", "FAILED"]``. Jobs submitted while it waits count.
    ``BackendTimeout`` after ``timeout`` seconds; ``BackendUnavailable`` if the session ends."""
    book = session._book
    deadline = None if timeout is None else time.monotonic() + timeout
    with session._changed:
        since = book.finished
        while (got := book.finish_since(since)) is None:
            if session.phase in ("dead", "closed"):
                raise BackendUnavailable(f"wait4_any_job_finish: session {session.name!r} is {session.phase}")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise BackendTimeout(f"wait4_any_job_finish: no job finished within {timeout:g} s")
            session._changed.wait(remaining)
        return list(got)


def _wait(session: QcgSession, names: list[str], timeout: float | None, operation: str) -> dict[str, str]:
    book = session._book
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pending = [n for n in names if not book.is_final(n) and not ((s := book.last.get(n)) and s.native == REMOVED)]
        if not pending:
            return {n: book.last[n].native for n in names}
        if session.phase in ("dead", "closed"):
            raise BackendUnavailable(f"{operation}: session {session.name!r} is {session.phase}")
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise BackendTimeout(f"{operation}: {len(pending)} jobs not finished after {timeout:g} s: "
                                 f"{pending[:5]}")
        session._changed.wait(remaining)


__all__ = ["OPS"]
