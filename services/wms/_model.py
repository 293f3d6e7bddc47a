"""What a ctrl_bps (WMS backend) session knows: state mapping, plain-data conversion of ctrl_bps reports, and the
diff that turns observed native states into ``StateChanged`` events.

Keys: a workflow is keyed by its wms id (for Parsl the submit path, for HTCondor the DAGMan job
id); its jobs by ``<wms id>/<job name>``. Every event carries ``attrs`` ``kind`` ("workflow" or
"job"), ``wms_id`` and ``name`` (run or job name), so a resync can tell them apart. ``native``
is always a ``WmsStates`` name.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowbus.schemas import Event, Observed, State, StateChanged

BACKEND = "wms"
WORKFLOW = "workflow"
JOB = "job"

#: WmsStates name -> normalised state
WMS_TO_STATE: dict[str, State] = {
    "UNKNOWN": State.UNKNOWN,
    "MISFIT": State.UNKNOWN,
    "UNREADY": State.QUEUED,
    "READY": State.QUEUED,
    "PENDING": State.SUBMITTED,
    "RUNNING": State.ACTIVE,
    "HELD": State.SUSPENDED,
    "SUCCEEDED": State.COMPLETE,
    "FAILED": State.ABORTED,
    "DELETED": State.CANCELLED,
    "PRUNED": State.CANCELLED,
}
FINAL_NATIVE = frozenset({"SUCCEEDED", "FAILED", "DELETED", "PRUNED"})

#: Parsl task status (``AppFuture.task_status()``) -> WmsStates name. The DFK never reports
#: ``running``: ``launched`` (handed to the executor) is the closest to "running" it knows.
PARSL_TO_WMS: dict[str, str] = {
    "unsched": "UNREADY",
    "pending": "UNREADY",
    "launched": "RUNNING",
    "running": "RUNNING",
    "running_ended": "RUNNING",
    "joining": "RUNNING",
    "fail_retryable": "RUNNING",
    "exec_done": "SUCCEEDED",
    "memo_done": "SUCCEEDED",
    "failed": "FAILED",
    "dep_fail": "PRUNED",
}


def state_of(native: str) -> State:
    return WMS_TO_STATE.get(native, State.UNKNOWN)


def job_key(wms_id: str, job: str) -> str:
    return f"{wms_id}/{job}"


def state_name(state: Any) -> str:
    """The ``WmsStates`` name of a reported state ("UNKNOWN" when there is none)."""
    return str(getattr(state, "name", state) or "UNKNOWN")


def changed(events: Iterable[StateChanged | None]) -> list[Event]:
    """The events of :meth:`Tracker.observe` calls that saw a change."""
    return [e for e in events if e is not None]


def plain(value: Any) -> Any:
    """ctrl_bps results as msgpack-friendly data: dataclasses (WmsRunReport, WmsJobReport) become
    dicts, enums their names (also as dict keys), other objects their ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value.name if isinstance(value, enum.Enum) else value
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {(k.name if isinstance(k, enum.Enum) else str(k)): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass(frozen=True)
class Seen:
    """One resource as last published."""

    native: str
    kind: str
    wms_id: str
    name: str
    detail: str = ""


class Tracker:
    """Last published state per key; :meth:`observe` returns the event for a change (or None)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.seen: dict[str, Seen] = {}

    def seed(self, known: Mapping[str, Event]) -> None:
        """Start from the journal's last states (only this backend's StateChanged)."""
        for key, ev in known.items():
            if isinstance(ev, StateChanged):
                attrs = ev.attrs or {}
                self.seen[key] = Seen(ev.native, str(attrs.get("kind", "")), str(attrs.get("wms_id", "")),
                                      str(attrs.get("name", "")), ev.detail)

    def observe(self, key: str, native: str, kind: str, wms_id: str, name: str, observed: Observed,
                detail: str = "") -> StateChanged | None:
        old = self.seen.get(key)
        if old is not None and old.native == native:
            return None
        self.seen[key] = Seen(native, kind, wms_id, name, detail)
        return StateChanged(
            source=self.source, backend=BACKEND, key=key, observed=observed, state=state_of(native), native=native,
            previous=state_of(old.native) if old is not None else None,
            native_previous=old.native if old is not None else "", detail=detail,
            attrs={"kind": kind, "wms_id": wms_id, "name": name})

    def workflows(self) -> dict[str, Seen]:
        return {k: s for k, s in self.seen.items() if s.kind == WORKFLOW}

    def jobs_of(self, wms_id: str) -> dict[str, Seen]:
        return {k: s for k, s in self.seen.items() if s.kind == JOB and s.wms_id == wms_id}

    def view(self, wms_id: str) -> dict[str, Any]:
        """The session's view of one workflow, as plain data."""
        wf = self.seen.get(wms_id)
        jobs = {s.name: s.native for s in self.jobs_of(wms_id).values()}
        return {"wms_id": wms_id, "name": wf.name if wf else "", "state": wf.native if wf else "UNKNOWN",
                "detail": wf.detail if wf else "", "jobs": jobs}


__all__ = ["BACKEND", "FINAL_NATIVE", "JOB", "PARSL_TO_WMS", "WMS_TO_STATE", "WORKFLOW", "Seen", "Tracker",
           "changed", "job_key", "plain", "state_name", "state_of"]
