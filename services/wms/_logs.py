"""``logs``: a ctrl_bps job's stdout and stderr where the WMS service keeps them.

The Parsl service writes them to ``<submitPath>/logs/[<subdir>/]<job>.stdout|.stderr``; the
session reads the names from the Parsl job it runs, or (a run of an earlier session) finds them
under ``<submitPath>/logs``. A job retried by Parsl appends to the same files. Other services
keep no output the session can read: the answer says so.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowbus.schemas import BackendRejected

from .._tail import DEFAULT_MAX_BYTES, check_max_bytes, file_parts, result
from ._model import JOB
from ._ops import OPS

if TYPE_CHECKING:
    from ._session import WmsSession


def _files(session: WmsSession, wms_id: str, job: str) -> list[tuple[str, str]]:
    run = session._runs.get(wms_id)
    pj = run.wf.jobs.get(job) if run is not None else None
    out, err = getattr(pj, "stdout", None), getattr(pj, "stderr", None)
    if isinstance(out, str) and isinstance(err, str):
        return [("stdout", out), ("stderr", err)]
    logs_dir = Path(wms_id) / "logs"
    found = sorted(logs_dir.rglob(f"{glob.escape(job)}.stdout")) if logs_dir.is_dir() else []
    base = str(found[0])[:-len(".stdout")] if found else os.path.join(logs_dir, job)
    return [("stdout", base + ".stdout"), ("stderr", base + ".stderr")]


@OPS.op
def logs(session: WmsSession, key: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The stdout and stderr of job ``key`` (``"<wms id>/<job>"``): the last ``max_bytes`` of each."""
    limit = check_max_bytes(max_bytes)
    session._require_up("logs")
    with session._lock:
        seen = session._tracker.seen.get(str(key)) if isinstance(key, str) else None
        if seen is None:
            raise BackendRejected(f"logs: unknown workflow or job {key!r} in session {session.name!r}")
        if seen.kind != JOB:
            jobs = sorted(session._tracker.jobs_of(seen.wms_id))
            return result(key, [], f"workflow {seen.name!r} has no output of its own: ask one of its jobs "
                                   f"({', '.join(jobs[:5]) or 'none'})")
        if not session.is_parsl:
            return result(key, [], f"{session.class_path} keeps no job output flowbus can read "
                                   "(only the Parsl service writes it under the submit path)")
        files = _files(session, seen.wms_id, seen.name)
    parts, missing = file_parts(files, limit)
    waiting = " (the job has not started)" if seen.native in ("UNREADY", "READY", "PENDING") else ""
    return result(key, parts, "; ".join(missing) + waiting)


__all__ = ["logs"]
