"""``logs``: a soma-workflow job's stdout and stderr, which soma keeps for every job it ran
(``retrieve_job_stdouterr`` copies them out; the copies are read and removed at once).

Keys are the bus keys: ``"<workflow id>/<job>"`` (the job's name, ``name#id`` where a name
repeats). A workflow (``"<workflow id>"``) has no output of its own.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

from flowbus.schemas import BackendRejected

from .._tail import DEFAULT_MAX_BYTES, check_max_bytes, file_parts, result
from ._ops import OPS
from ._wf import job_names

if TYPE_CHECKING:
    from ._session import SomaSession


@OPS.op
def logs(session: SomaSession, key: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The stdout and stderr of job ``key`` (``"<workflow id>/<job>"``): the last ``max_bytes`` of each."""
    limit = check_max_bytes(max_bytes)
    wf, sep, job = key.partition("/") if isinstance(key, str) else ("", "", "")
    if not wf.isdigit():
        raise BackendRejected(f"logs: key must be '<workflow id>/<job>' or '<workflow id>', got {key!r}")
    wf_id = int(wf)
    with session._using("logs") as wc:
        names = job_names(wc, wf_id)  # an unknown workflow id raises soma's UnknownObjectError
    if not sep:
        return result(key, [], f"workflow {wf_id} has no output of its own: ask one of its jobs "
                               f"({', '.join(f'{wf_id}/{n}' for n in sorted(names.values())[:5]) or 'none'})")
    job_id = next((jid for jid, n in names.items() if n == job), None)
    if job_id is None:
        raise BackendRejected(f"logs: unknown job {key!r} in session {session.name!r}; jobs of workflow "
                              f"{wf_id}: {', '.join(sorted(names.values())) or '(none)'}")
    with tempfile.TemporaryDirectory(prefix="flowbus-soma-logs-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        with session._using("logs") as wc:
            wc.retrieve_job_stdouterr(job_id, out, err)
        parts, missing = file_parts([("stdout", out), ("stderr", err)], limit)
    for p in parts:
        p["path"] = None  # a copy that is gone now; soma's own files are its business
    return result(key, parts, f"soma holds no output for job {job_id} (not run yet?)" if missing else "")


__all__ = ["logs"]
