"""What one QCG manager says, as job events: the whole picture (:func:`snapshot`), a periodic
reconciliation (:func:`reconcile`) and the status publisher's news (:func:`drain`).

Each asks the manager through the link's client and lets the session's :class:`~._jobs.JobBook`
decide what is a change; the caller publishes the events returned. QCG's exceptions pass through
(the session maps them at its edge), except a detail query refused because a job vanished
meanwhile: that one is logged and the news is published without the details.
"""

from __future__ import annotations

from typing import Any

from flowbus.schemas import BackendRejected, Observed, StateChanged

from .._base import map_errors
from ._client import QCG_ERRORS
from ._jobs import FINAL_NATIVE, JobBook, Obs, Snapshot, key_of, obs_from_info, obs_from_list
from ._link import Client, Link


def snapshot(client: Client) -> Snapshot:
    """Everything the manager holds: ``list()`` plus ``info(withChilds)`` of every job."""
    jobs = client.list()
    snap = Snapshot(parents=set(jobs), obs=obs_from_list(jobs))
    if jobs:
        snap.obs.update(obs_from_info(client.info(sorted(jobs), withChilds=True)))
    return snap


def reconcile(book: JobBook, link: Link) -> list[StateChanged]:
    """``list()`` against the book (``observed=poll``); details only for iterated jobs still
    running or changed, and for fresh failures (their exit code and message)."""
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
    events = book.diff(snap, Observed.POLL, f"no longer known to QCG manager {link.instance_id}")
    book.suspect.difference_update(n for n in list(book.suspect) if book.is_final(n))
    link.track()
    return events


def drain(book: JobBook, link: Link, log: Any) -> list[StateChanged]:
    """The publisher's messages ready now, for this manager instance (``observed=push``)."""
    if link.sub is None:
        return []
    iid = link.instance_id
    items: list[tuple[str, str, str]] = []  # (key, job, native)
    for topic, data in link.sub.drain():
        job, native, it = data.get("job"), data.get("state"), data.get("it")
        if topic == "NOJ" or data.get("manager") != iid or not isinstance(job, str) or not isinstance(native, str):
            continue
        if job in book.removed:
            continue  # late news about a job removed from the manager
        items.append((key_of(job, it if isinstance(it, int) else None), job, native))
    if not items:
        return []
    # a reused name: the old job's final events may still be in flight, so a final state is
    # believed only once the manager confirms it (earlier states cannot end the job wrongly)
    verify = {job for _, job, native in items if job in book.suspect and native in FINAL_NATIVE}
    failed = {job for key, job, native in items if native == "FAILED" and not book.is_final(key)}
    details: dict[str, Obs] = {}
    if verify or failed:
        try:
            with map_errors(QCG_ERRORS, "info"):
                details = obs_from_info(link.client.info(sorted(verify | failed), withChilds=True))
        except BackendRejected as exc:  # a job vanished meanwhile; reconciliation will tell
            log.info("qcg.event.detail_failed", error=str(exc))
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
    if executing:
        link.track()
    return events


__all__ = ["drain", "reconcile", "snapshot"]
