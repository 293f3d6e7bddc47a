"""``logs``: a QCG job's stdout and stderr, as named in the spec the session submitted.

QCG writes them relative to the job's working directory (the spec's ``wd``, itself relative to
the manager's ``Wd``; the manager's ``Wd`` when there is none). An iteration's key is
``name:N``; ``${it}`` in a file name is that N, ``${jname}`` the job's name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flowbus.schemas import BackendRejected

from .._tail import DEFAULT_MAX_BYTES, check_max_bytes, file_parts, result
from . import _forms as forms
from ._jobs import split_key
from ._ops import OPS

if TYPE_CHECKING:
    from ._session import QcgSession


def _files(spec: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """The spec's ``wd`` ("" for none) and its ``stdout``/``stderr`` names, in either form."""
    where: Mapping[str, Any] = spec.get("execution") or {} if forms.is_std(spec) else spec
    names = {n: str(where[n]) for n in ("stdout", "stderr") if isinstance(where.get(n), str) and where[n]}
    wd = where.get("wd")
    return (str(wd) if isinstance(wd, str) else ""), names


def _expand(text: str, job: str, iteration: int | None) -> str:
    text = text.replace("${jname}", job)
    return text if iteration is None else text.replace("${it}", str(iteration))


@OPS.op
def logs(session: QcgSession, key: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The stdout and stderr of job (or iteration ``name:N``) ``key``: the last ``max_bytes`` of each."""
    limit = check_max_bytes(max_bytes)
    if not isinstance(key, str) or not key:
        raise BackendRejected(f"logs: key must be a job name or 'name:N', got {key!r}")
    job, iteration = split_key(key)
    book = session._book
    spec = book.specs.get(job)
    if spec is None:
        held = job in book.seen and job not in book.removed
        raise BackendRejected(f"logs: unknown job {key!r} in session {session.name!r}" if not held else
                              f"logs: job {key!r} was not submitted by session {session.name!r}: its spec "
                              "(and so its stdout/stderr) is not known here")
    if iteration is not None and "iteration" not in spec:
        raise BackendRejected(f"logs: unknown job {key!r} in session {session.name!r}: job {job!r} has no iterations")
    with session._using("logs") as client:
        manager_wd = str(client.system_status()["System"]["Wd"])
    wd, names = _files(spec)
    if not names:
        return result(key, [], f"job {job!r} was submitted without stdout/stderr: QCG kept no output")
    if iteration is None and any("${it}" in n for n in names.values()):
        return result(key, [], f"job {job!r} writes one output per iteration: ask for '{job}:N'")
    base = os.path.join(manager_wd, _expand(wd, job, iteration)) if wd else manager_wd
    files = [(name, os.path.join(base, _expand(path, job, iteration))) for name, path in names.items()]
    parts, missing = file_parts(files, limit)
    return result(key, parts, "; ".join(missing))


__all__ = ["logs"]
