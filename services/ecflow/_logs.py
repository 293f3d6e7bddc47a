"""``logs``: a task's job output (``ECF_JOBOUT`` of its current try).

The file is read here when it is readable (the server and the session share a file system);
otherwise the server's own file command (``get_file(path, "jobout")``) fetches it, which also
covers an ``ECF_LOGHOST`` log server. Suites and families have no job output of their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ecflow

from flowbus.schemas import BackendRejected

from .._tail import DEFAULT_MAX_BYTES, Part, check_max_bytes, file_part, part, result
from ._errors import as_str
from ._ops import OPS

if TYPE_CHECKING:
    from ._session import EcflowSession


def _jobout(node: Any) -> tuple[str, int]:
    """The node's ``ECF_JOBOUT`` and try number, as the server would generate them now."""
    var = node.find_gen_variable("ECF_JOBOUT")
    if var.empty() or not var.value():
        node.update_generated_variables()
        var = node.find_gen_variable("ECF_JOBOUT")
    return str(var.value()), int(node.get_try_no())


@OPS.op
def logs(session: EcflowSession, key: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The job output of task ``key`` (its current try), the last ``max_bytes`` of it."""
    limit = check_max_bytes(max_bytes)
    path = as_str(key, "logs")
    with session._using("logs") as client:
        defs = client.get_defs()
        node = defs.find_abs_node(path) if defs is not None else None
        if node is None:
            raise BackendRejected(f"logs: unknown node {path!r} on session {session.name!r}")
        if not isinstance(node, ecflow.Task):
            kind = type(node).__name__.lower()
            return result(path, [], f"{path} is a {kind}: only tasks have job output (ask one of its tasks)")
        jobout, try_no = _jobout(node)
        if try_no == 0:
            return result(path, [], f"{path} has not been submitted yet (try 0): there is no job output")
        name = f"jobout.{try_no}"
        try:
            return result(path, [file_part(name, jobout, limit)])
        except OSError as exc:
            local = exc.strerror or str(exc)
        try:
            # the server keeps the last lines; a line holds at least one byte, so this cuts no more
            text = str(client.get_file(path, "jobout", str(limit)))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            return result(path, [], f"job output {jobout} of try {try_no}: not readable here ({local}) "
                                    f"and the server could not send it ({reason})")
    got: Part = part(name, jobout, text.encode("utf-8", errors="replace"), limit)
    return result(path, [got])


__all__ = ["logs"]
