"""The session's own view of QCG jobs (sans-I/O): state mapping, change detection, recovery plans.

Keys are job names, and ``"<job>:<iteration>"`` for iterations (QCG itself splits names on ``:``).
:class:`JobBook` decides which observations are real changes and builds the ``StateChanged``
events; it never talks to the manager.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowbus.schemas import Event, Observed, State, StateChanged

from . import _forms as forms

#: QCG native state -> normalised state
STATE_OF: Mapping[str, State] = {
    "QUEUED": State.QUEUED,
    "SCHEDULED": State.SUBMITTED,
    "EXECUTING": State.ACTIVE,
    "SUCCEED": State.COMPLETE,
    "FAILED": State.ABORTED,
    "CANCELED": State.CANCELLED,
    "OMITTED": State.CANCELLED,
}
#: the native word for a job the manager does not know any more
LOST = "LOST"
#: the native word for a job the session removed from the manager (``remove``)
REMOVED = "REMOVED"
#: the states after which a key is no longer the manager's (published with ``state`` unknown)
GONE_NATIVE = frozenset({LOST, REMOVED})
#: finished keys remembered for ``wait4_any_job_finish``
_FINISHES_KEPT = 10_000
FINAL_NATIVE = frozenset({"SUCCEED", "FAILED", "CANCELED", "OMITTED"})
_RANK: Mapping[str, int] = {"QUEUED": 0, "SCHEDULED": 1, "EXECUTING": 2,
                            "SUCCEED": 3, "FAILED": 3, "CANCELED": 3, "OMITTED": 3}


def state_of(native: str) -> State:
    return STATE_OF.get(native, State.UNKNOWN)


def split_key(key: str) -> tuple[str, int | None]:
    """``"job:3"`` -> ``("job", 3)``; ``"job"`` -> ``("job", None)``."""
    job, sep, it = key.partition(":")
    if sep and it.lstrip("-").isdigit():
        return job, int(it)
    return key, None


def key_of(job: str, iteration: int | None) -> str:
    return job if iteration is None else f"{job}:{iteration}"


@dataclass(frozen=True)
class Obs:
    """One observation of a job or iteration: QCG's state word plus what else we learned."""

    native: str
    detail: str = ""
    exit_code: int | None = None


@dataclass(frozen=True)
class Seen:
    state: State
    native: str

    @property
    def final(self) -> bool:
        return bool(self.state.final)


@dataclass
class Snapshot:
    """What the manager reported: ``parents`` are the job names it holds (all of them when
    ``complete``), ``obs`` maps keys (jobs and iterations) to observations."""

    parents: set[str] = field(default_factory=set)
    obs: dict[str, Obs] = field(default_factory=dict)
    complete: bool = True


def _exit_code(runtime: Mapping[str, Any]) -> int | None:
    raw = runtime.get("exit_code")
    try:
        return None if raw is None or raw == "" else int(raw)
    except (TypeError, ValueError):
        return None


def _detail(messages: Any, exit_code: int | None) -> str:
    if messages:
        return str(messages)
    return "" if exit_code is None else f"exit code {exit_code}"


def obs_from_info(info: Mapping[str, Any]) -> dict[str, Obs]:
    """Observations from a ``jobInfo`` reply (``{'jobs': {name: {'status', 'data'}}}``),
    iterations included when it was asked ``withChilds``."""
    out: dict[str, Obs] = {}
    for name, entry in (info.get("jobs") or {}).items():
        data = entry.get("data") or {}
        if entry.get("status", 0) != 0 or "status" not in data:
            continue
        runtime = data.get("runtime") or {}
        code = _exit_code(runtime)
        out[name] = Obs(str(data["status"]), _detail(data.get("messages"), code), code)
        for child in data.get("childs") or []:
            ccode = _exit_code(child.get("runtime") or {})
            out[key_of(name, int(child["iteration"]))] = Obs(str(child["state"]), _detail(None, ccode), ccode)
    return out


def obs_from_list(jobs: Mapping[str, Any]) -> dict[str, Obs]:
    """Observations from a ``listJobs`` reply (``{name: {'status', 'messages', 'inQueue'}}``)."""
    return {name: Obs(str(d.get("status", "")), str(d.get("messages") or "")) for name, d in jobs.items()}


class JobBook:
    """Last-known state per key, submitted specs, and the rules for what counts as a change.

    Push observations (QCG's publisher) may be stale or late: they never move a key backwards
    and never leave a final state. Poll and resync observations come from a request/reply and
    are authoritative. Names reused in the same manager (remove + submit) are *suspect* until
    the session has confirmed the new job by a query, because the old job's final events may
    still be in flight.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.last: dict[str, Seen] = {}
        self.parent_of: dict[str, str] = {}
        #: job name -> the keyword set it was submitted with, in submission order
        self.specs: dict[str, dict[str, Any]] = {}
        #: names the current manager holds or held (reset when the manager changes)
        self.seen: set[str] = set()
        self.removed: set[str] = set()
        self.suspect: set[str] = set()
        self.iterative: set[str] = set()
        #: every key that reached a final state, in order, as ``(key, native)``, and how many
        #: did so far (``wait4_any_job_finish`` waits for the count to move)
        self.finishes: deque[tuple[str, str]] = deque(maxlen=_FINISHES_KEPT)
        self.finished = 0

    # -- bookkeeping -----------------------------------------------------------------------------

    def seed(self, known: Mapping[str, Event]) -> None:
        """Adopt the host's last states (``StateChanged`` values only)."""
        for key, ev in known.items():
            if isinstance(ev, StateChanged):
                self.last[key] = Seen(ev.state, ev.native)
                parent = ev.attrs.get("parent")
                self._parent(key, str(parent) if parent else None)

    def _parent(self, key: str, parent: str | None = None) -> str:
        if key not in self.parent_of:
            job, it = split_key(key)
            self.parent_of[key] = parent or job
            if it is not None:
                self.iterative.add(self.parent_of[key])
        return self.parent_of[key]

    def new_manager(self) -> None:
        """The session now talks to another manager instance: per-manager memory is void."""
        self.seen.clear()
        self.removed.clear()
        self.suspect.clear()

    def record(self, specs: Iterable[Mapping[str, Any]]) -> None:
        for spec in specs:
            name = str(spec["name"])
            self.specs[name] = copy.deepcopy(dict(spec))
            if "iteration" in spec:
                self.iterative.add(name)

    def is_final(self, key: str) -> bool:
        seen = self.last.get(key)
        return bool(seen and seen.final)

    def keys_of(self, parents: Iterable[str]) -> list[str]:
        wanted = set(parents)
        return [k for k in self.last if self._parent(k) in wanted]

    def unfinished(self) -> list[str]:
        return [k for k, s in self.last.items() if not s.final and s.native not in GONE_NATIVE]

    def finish_since(self, count: int) -> tuple[str, str] | None:
        """The first ``(key, native)`` that finished after ``count`` finishes, or None."""
        if self.finished <= count:
            return None
        return self.finishes[max(0, len(self.finishes) - (self.finished - count))]

    # -- events ----------------------------------------------------------------------------------

    def _event(self, key: str, native: str, observed: Observed, prev: Seen | None, detail: str = "",
               exit_code: int | None = None) -> StateChanged:
        state = State.UNKNOWN if native in GONE_NATIVE else state_of(native)
        attrs: dict[str, str | int | float | bool | None] = {}
        parent = self._parent(key)
        if parent != key:
            attrs["parent"] = parent
            attrs["iteration"] = split_key(key)[1]
        if exit_code is not None:
            attrs["exit_code"] = exit_code
        self.last[key] = Seen(state, native)
        if state.final and not (prev is not None and prev.final):
            self.finishes.append((key, native))
            self.finished += 1
        return StateChanged(source=self.source, backend="qcg", key=key, observed=observed, state=state,
                            native=native, previous=prev.state if prev else None,
                            native_previous=prev.native if prev else "", detail=detail, attrs=attrs)

    def change(self, key: str, obs: Obs, observed: Observed) -> StateChanged | None:
        """The event for ``obs`` if it is a real change, else None."""
        prev = self.last.get(key)
        state = state_of(obs.native)
        if state is State.UNKNOWN:
            return None
        if prev is not None and prev.state is state and (prev.native == obs.native or not prev.native):
            return None
        if observed is Observed.PUSH and prev is not None and (
                prev.final or _RANK.get(obs.native, -1) < _RANK.get(prev.native, -1)):
            return None  # stale or late: the publisher is only a hint
        code = 0 if obs.exit_code is None and obs.native == "SUCCEED" else obs.exit_code
        return self._event(key, obs.native, observed, prev, obs.detail, code)

    def submitted(self, names: Iterable[str]) -> list[StateChanged]:
        """``queued`` for freshly submitted jobs; a reused name restarts from ``queued``."""
        out: list[StateChanged] = []
        for name in names:
            if name in self.seen:
                self.suspect.add(name)
            self.seen.add(name)
            self.removed.discard(name)
            prev = self.last.get(name)
            out.append(self._event(name, "QUEUED", Observed.PUSH, prev))
        return out

    def forget(self, names: Iterable[str]) -> None:
        """Jobs removed from the manager: drop their specs; late events for them are ignored."""
        for name in names:
            self.specs.pop(name, None)
            self.removed.add(name)
            self.suspect.discard(name)

    def drop(self, keys: Iterable[str]) -> None:
        """Retention passed: forget these keys (a job and its iterations) entirely."""
        for key in keys:
            self.last.pop(key, None)
            parent = self.parent_of.pop(key, key)
            if parent == key:
                self.specs.pop(key, None)
                self.seen.discard(key)
                self.removed.discard(key)
                self.suspect.discard(key)
                self.iterative.discard(key)

    def removal(self, names: Iterable[str], detail: str) -> list[StateChanged]:
        """``unknown``/``REMOVED`` for each key of the ``names`` (a job and its iterations) the
        manager removed (``observed=poll``: the manager's reply says so)."""
        out: list[StateChanged] = []
        for key in self.keys_of(names):
            prev = self.last[key]
            if prev.native != REMOVED:
                out.append(self._event(key, REMOVED, Observed.POLL, prev, detail))
        return out

    def lost(self, keys: Iterable[str], observed: Observed, detail: str) -> list[StateChanged]:
        """``unknown``/``LOST`` for each key not already final, lost or removed."""
        out: list[StateChanged] = []
        for key in keys:
            prev = self.last.get(key)
            if prev is None or prev.final or prev.native in GONE_NATIVE:
                continue
            out.append(self._event(key, LOST, observed, prev, detail))
        return out

    def diff(self, snap: Snapshot, observed: Observed, lost_detail: str) -> list[StateChanged]:
        """Events that bring our view in line with ``snap`` (authoritative)."""
        out: list[StateChanged] = []
        self.seen.update(snap.parents)
        for key, obs in snap.obs.items():
            self._parent(key)
            ev = self.change(key, obs, observed)
            if ev is not None:
                out.append(ev)
        if snap.complete:
            missing = [k for k in list(self.last) if k not in snap.obs
                       and self._parent(k) not in snap.parents and self._parent(k) not in self.removed]
            out.extend(self.lost(missing, observed, lost_detail))
        return out

    def resubmission(self) -> list[dict[str, Any]]:
        """Specs of recorded jobs that did not finish, in submission order, ready for a fresh
        manager: ``after`` entries naming jobs that had SUCCEEDED are dropped (the new manager
        does not know them and would omit the dependant)."""
        return [self.respec(name) for name in self.specs if not self.is_final(name)]

    def respec(self, name: str) -> dict[str, Any]:
        """A copy of ``name``'s recorded spec to submit again: ``after`` entries naming jobs
        that SUCCEEDED are dropped (a fresh manager does not know them; one that still holds
        them would have nothing to wait for). KeyError when no spec is recorded."""
        spec = self.specs[name]
        after = [d for d in forms.deps(spec) if (s := self.last.get(d)) is None or s.native != "SUCCEED"]
        return forms.with_deps(spec, after)


__all__ = ["FINAL_NATIVE", "GONE_NATIVE", "LOST", "REMOVED", "STATE_OF", "JobBook", "Obs", "Seen", "Snapshot", "key_of",
           "obs_from_info", "obs_from_list", "split_key", "state_of"]
