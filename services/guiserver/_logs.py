"""``logs``: what a DiFX job said, for a job this session started (or resynced).

Two parts: ``messages``, the job's DIFX_MESSAGE/WARNING/ERROR lines the session received (kept
in memory, the last 256 KiB of each of the last 64 jobs; lost when the session process ends),
and ``difxlog``, the job's ``<job>.difxlog`` beside its ``.input``, fetched through guiServer's
file transfer when the server can send it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowbus.schemas import BackendError, BackendRejected

from .._tail import DEFAULT_MAX_BYTES, Part, check_max_bytes, part, result
from ._ops import OPS, get_file

if TYPE_CHECKING:
    from ._session import GuiserverSession


@OPS.op
def logs(session: GuiserverSession, key: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The messages and the ``.difxlog`` of job ``key``: the last ``max_bytes`` of each."""
    limit = check_max_bytes(max_bytes)
    if not isinstance(key, str) or not key:
        raise BackendRejected(f"logs: key must be a job name, got {key!r}")
    with session._lock:
        track = session._tx.job(key)
        if track is None:
            raise BackendRejected(f"logs: unknown job {key!r} in session {session.name!r}; known jobs: "
                                  f"{', '.join(sorted(session._tx.states())) or '(none)'}")
        kept = session._tx.messages.get(track.name)
        up = session.phase == "up"
    parts: list[Part] = []
    notes: list[str] = []
    if kept is not None:
        parts.append(part("messages", None, kept[0], limit, cut_before=kept[1]))
    else:
        notes.append("no DiFX message of this job reached this session")
    difxlog = track.input[:-len(".input")] + ".difxlog" if track.input.endswith(".input") else ""
    if difxlog and up:
        try:
            parts.append(part("difxlog", difxlog, get_file(session, difxlog), limit))
        except BackendError as exc:
            notes.append(f"{difxlog}: {exc}")
    elif difxlog:
        notes.append(f"{difxlog}: session {session.name!r} is {session.phase}")
    return result(key, parts, "; ".join(notes))


__all__ = ["logs"]
