"""File transfers as :class:`~flowbus.services.soma.SomaSession` observes them.

soma-workflow keeps a transfer's status in its database and tells no one when it changes, like a
job's. The session reads them at each poll and publishes the differences as ``StateChanged``:

- a transfer registered alone (``register_transfer``): key ``transfer/<transfer id>``, read from
  ``transfers()`` and ``transfer_status``; ``delete_transfer`` makes soma expire it (it is disposed
  of later), so an expired transfer counts as deleted (``UNKNOWN``, ``native=""``);
- a transfer a workflow declares (a job's input or output file): key
  ``<workflow id>/transfer/<transfer id>``, read with the workflow's ``workflow_elements_status``
  (see :func:`~._wf.read_workflow`); it goes when the workflow goes.

States: ``do not exist`` and ``on client side`` (waiting: an output not produced yet, an input not
copied yet) are ``QUEUED``; ``transfering ...``, ``under edition`` and ``on computing resource side``
(an output produced, not copied back yet) are ``ACTIVE``; ``on both sides`` is ``COMPLETE``.
``attrs``: ``transfer_id``, ``client_path``, ``engine_path`` (and ``workflow_id`` in a workflow).
"""

from __future__ import annotations

import datetime
from typing import Any

import soma_workflow.constants as C  # noqa: N812 - soma's constants module, named like them
from soma_workflow.errors import UnknownObjectError

from flowbus.schemas import State

from ._wf import Obs

#: transfer status -> normalised state
TRANSFER_STATES = {
    C.FILES_DO_NOT_EXIST: State.QUEUED,
    C.FILES_ON_CLIENT: State.QUEUED,
    C.TRANSFERING_FROM_CLIENT_TO_CR: State.ACTIVE,
    C.TRANSFERING_FROM_CR_TO_CLIENT: State.ACTIVE,
    C.FILES_UNDER_EDITION: State.ACTIVE,
    C.FILES_ON_CR: State.ACTIVE,
    C.FILES_ON_CLIENT_AND_CR: State.COMPLETE,
}

PREFIX = "transfer/"


def transfer_obs(transfer_id: int, status: str, client_path: Any, engine_path: Any,
                 workflow_id: int | None = None) -> Obs:
    attrs: list[tuple[str, Any]] = [("transfer_id", int(transfer_id)),
                                    ("client_path", None if client_path is None else str(client_path)),
                                    ("engine_path", None if engine_path is None else str(engine_path))]
    if workflow_id is not None:
        attrs.append(("workflow_id", int(workflow_id)))
    return Obs(TRANSFER_STATES.get(status, State.UNKNOWN), str(status), tuple(attrs))


def expired(when: Any, now: datetime.datetime | None = None) -> bool:
    """Whether a soma expiration date (``datetime`` or ``date``) is past: deleted transfers are."""
    now = now or datetime.datetime.now()
    if isinstance(when, datetime.datetime):
        return when <= now
    if isinstance(when, datetime.date):
        return when < now.date()
    return False


def read_standalone(wc: Any) -> dict[str, Obs]:
    """The transfers registered alone that are not deleted: key -> observation.

    Raises soma's errors (the caller maps them)."""
    out: dict[str, Obs] = {}
    for tid, info in dict(wc.transfers()).items():
        engine_path, client_path, expiration = [*info, None, None, None][:3]
        if expired(expiration):
            continue
        try:
            status = wc.transfer_status(int(tid))[0]
        except UnknownObjectError:  # deleted between the listing and the read
            continue
        out[f"{PREFIX}{int(tid)}"] = transfer_obs(int(tid), str(status), client_path, engine_path)
    return out


def workflow_transfers(wf_id: int, rows: Any) -> dict[str, Obs]:
    """``workflow_elements_status``'s transfer rows: ``(id, (status, progression, engine path,
    client path, client paths))``."""
    out: dict[str, Obs] = {}
    for row in rows or ():
        tid, info = row[0], [*row[1], None, None, None, None, None]
        out[f"{wf_id}/{PREFIX}{int(tid)}"] = transfer_obs(int(tid), str(info[0]), info[3], info[2], wf_id)
    return out


__all__ = ["PREFIX", "TRANSFER_STATES", "expired", "read_standalone", "transfer_obs", "workflow_transfers"]
