"""Sans-I/O recovery policies: retry with backoff, stalled resources, backends that stay down.

A :class:`Policy` is fed events and ticks like a rule and returns :class:`Recovery` decisions;
the host turns a decision into backend calls with :func:`recovery_calls` (each backend's own
retry, in one table here), reports the outcome back (:meth:`Policy.failed` schedules the next
attempt when a retry's calls failed), and publishes ``RecoveryAttempted``/``RecoveryGaveUp``.
Progress (attempts, due retries, timers, per-source seqs consumed) dumps and loads like the
rule engine's.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import msgspec

from flowbus.bus import Match
from flowbus.schemas import (
    Backend,
    ConfigError,
    Connected,
    Disconnected,
    Event,
    FlowbusError,
    PolicyConfig,
    State,
    StateChanged,
)

from ._engine import CallSpec, Catalog, check_match

#: backend -> the operation a retry runs (see :func:`recovery_calls` for the arguments)
RETRY_OPERATION: Mapping[str, str] = {
    Backend.ECFLOW.value: "requeue",
    Backend.QCG.value: "resubmit",  # or remove + submit of the spec the orchestrator saw
    Backend.SOMA.value: "restart_workflow",
    Backend.WMS.value: "restart",
    Backend.GUISERVER.value: "start_job",  # with force=True, after "stop_job" when still running
}
#: backend -> the operation that stops a stalled resource before kill-retry
KILL_OPERATION: Mapping[str, str] = {
    Backend.ECFLOW.value: "kill",
    Backend.QCG.value: "cancel",
    Backend.SOMA.value: "stop_workflow",
    Backend.WMS.value: "cancel",
    Backend.GUISERVER.value: "stop_job",
}

Kind = Literal["retry", "kill-retry", "alert", "gave-up"]


class Recovery(msgspec.Struct, frozen=True):
    """A decision: retry / kill-retry / alert for ``key`` of session ``source``, or give up
    (``key`` "" when the whole session is given up)."""

    policy: str
    kind: str
    source: str
    backend: str
    key: str
    attempt: int = 0
    reason: str = ""
    fields: dict[str, Any] = {}


def _corr(source: str, key: str) -> str:
    return f"{source}\x00{key}"


class Policy:
    """One policy's state machine (see :class:`flowbus.schemas.PolicyConfig`)."""

    def __init__(self, cfg: PolicyConfig, match: Match) -> None:
        self.cfg, self.match = cfg, match
        self.name = cfg.name
        segs = match.glob.split("/")
        self._session_glob = "/".join([*segs, "*"][:2])
        self._on = frozenset(cfg.on)
        self.fingerprint = hashlib.sha256(msgspec.json.encode(cfg)).hexdigest()[:16]
        self.hw: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.due: dict[str, tuple[float, Recovery]] = {}
        self.stalled: dict[str, tuple[float, dict[str, Any]]] = {}
        self.down: dict[str, tuple[float, str]] = {}
        self.gave_up: set[str] = set()
        self.skip_next: set[str] = set()

    # -- events -------------------------------------------------------------------------------------

    def covers_session(self, ev: Event) -> bool:
        return fnmatch.fnmatchcase(f"{ev.backend}/{ev.source}", self._session_glob)

    def feed(self, ev: Event, now: float) -> list[Recovery]:
        if ev.seq:
            if ev.seq <= self.hw.get(ev.source, 0):
                return []
            self.hw[ev.source] = ev.seq
        cfg = self.cfg
        if isinstance(ev, (Connected, Disconnected)):
            if cfg.give_up_after > 0 and self.covers_session(ev):
                if isinstance(ev, Disconnected):
                    self.down.setdefault(ev.source, (now + cfg.give_up_after, ev.backend))
                else:
                    self.down.pop(ev.source, None)
            return []
        corr = _corr(ev.source, ev.key)
        if not isinstance(ev, StateChanged) or not self.match(ev):
            if corr in self.stalled and self.covers_session(ev):  # progress of a watched resource
                self.stalled[corr] = (now + cfg.stalled_after, self.stalled[corr][1])
            return []
        fields = msgspec.to_builtins(ev)
        if cfg.stalled_after > 0:
            if ev.state is State.ACTIVE or (corr in self.stalled and not ev.state.final):
                self.stalled[corr] = (now + cfg.stalled_after, fields)
            else:
                self.stalled.pop(corr, None)
        if ev.state is State.COMPLETE:
            self.attempts.pop(corr, None)
            self.due.pop(corr, None)
            self.gave_up.discard(corr)
            self.skip_next.discard(corr)
            return []
        if ev.state.value not in self._on or not self._retryable(ev):
            return []
        if corr in self.skip_next:  # the end of what kill-retry stopped itself
            self.skip_next.discard(corr)
            return []
        if corr in self.due or corr in self.gave_up:
            return []
        return self._next(corr, ev.source, ev.backend, ev.key, fields, now, f"{ev.key} {ev.state.value} ({ev.native})")

    def _retryable(self, ev: StateChanged) -> bool:
        """Iterations (QCG ``job:n``) and jobs inside workflows (soma ``wf/job``, wms events with
        ``attrs.kind = "job"``) are retried through their job or workflow."""
        if ev.backend == Backend.QCG.value:
            return ":" not in ev.key
        if ev.backend == Backend.SOMA.value:
            return "/" not in ev.key
        if ev.backend == Backend.WMS.value:
            return ev.attrs.get("kind", "workflow") == "workflow"
        return True

    def _next(self, corr: str, source: str, backend: str, key: str, fields: dict[str, Any], now: float,
              reason: str, kind: str = "retry") -> list[Recovery]:
        attempt = self.attempts.get(corr, 0) + 1
        if attempt > self.cfg.max_attempts:
            self.gave_up.add(corr)
            self.due.pop(corr, None)
            return [Recovery(policy=self.name, kind="gave-up", source=source, backend=backend, key=key,
                             attempt=attempt - 1, reason=f"{reason}; {attempt - 1} attempt(s) made", fields=fields)]
        self.attempts[corr] = attempt
        delay = min(self.cfg.backoff * 2.0 ** (attempt - 1), self.cfg.backoff_max)
        rec = Recovery(policy=self.name, kind=kind, source=source, backend=backend, key=key, attempt=attempt,
                       reason=reason, fields=fields)
        if kind != "retry":
            return [rec]
        self.due[corr] = (now + delay, rec)
        return []

    def failed(self, rec: Recovery, now: float, error: str) -> list[Recovery]:
        """A retry's calls failed: schedule the next attempt, or give up."""
        corr = _corr(rec.source, rec.key)
        return self._next(corr, rec.source, rec.backend, rec.key, rec.fields, now,
                          f"attempt {rec.attempt} failed: {error}")

    def forget(self, source: str, key: str) -> bool:
        """The session forgot ``key``: drop what this policy holds about it, except a retry that
        is still due (it runs; the resource it recreates is followed anew). True if one is due."""
        corr = _corr(source, key)
        if corr not in self.due:
            self.attempts.pop(corr, None)
        self.stalled.pop(corr, None)
        self.gave_up.discard(corr)
        self.skip_next.discard(corr)
        return corr in self.due

    def size(self) -> int:
        """Per-resource entries held (the checkpoint's share of this policy)."""
        return len(self.attempts) + len(self.due) + len(self.stalled) + len(self.gave_up) + len(self.skip_next)

    # -- time -----------------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Recovery]:
        out: list[Recovery] = []
        for corr, (at, rec) in sorted(self.due.items(), key=lambda kv: kv[1][0]):
            if at <= now:
                del self.due[corr]
                out.append(rec)
        for corr, (at, fields) in sorted(self.stalled.items(), key=lambda kv: kv[1][0]):
            if at > now:
                continue
            del self.stalled[corr]
            source, key = str(fields.get("source", "")), str(fields.get("key", ""))
            reason = f"{key}: no event for {self.cfg.stalled_after:g} s"
            if self.cfg.on_stalled == "alert":
                out.append(Recovery(policy=self.name, kind="alert", source=source,
                                    backend=str(fields.get("backend", "")), key=key, reason=reason, fields=fields))
            else:
                recs = self._next(corr, source, str(fields.get("backend", "")), key, fields, now, reason, "kill-retry")
                if recs and recs[0].kind == "kill-retry":
                    self.skip_next.add(corr)
                out.extend(recs)
        for source, (at, backend) in sorted(self.down.items(), key=lambda kv: kv[1][0]):
            if at <= now:
                del self.down[source]
                out.append(Recovery(policy=self.name, kind="gave-up", source=source, backend=backend, key="",
                                    reason=f"session {source} disconnected for {self.cfg.give_up_after:g} s "
                                           "without reconnecting"))
        return out

    def deadline(self) -> float | None:
        ds = [at for at, _ in self.due.values()] + [at for at, _ in self.stalled.values()]
        ds += [at for at, _ in self.down.values()]
        return min(ds) if ds else None

    # -- checkpoint -----------------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {"fp": self.fingerprint, "hw": self.hw, "attempts": self.attempts,
                "due": {k: [at, r] for k, (at, r) in self.due.items()},
                "stalled": {k: [at, f] for k, (at, f) in self.stalled.items()},
                "down": {k: [at, b] for k, (at, b) in self.down.items()},
                "gave_up": sorted(self.gave_up), "skip_next": sorted(self.skip_next)}

    def load(self, data: Mapping[str, Any]) -> bool:
        if data.get("fp") != self.fingerprint:
            return False
        self.hw = {str(k): int(v) for k, v in data["hw"].items()}
        self.attempts = {str(k): int(v) for k, v in data["attempts"].items()}
        self.due = {k: (float(at), msgspec.convert(r, Recovery)) for k, (at, r) in data["due"].items()}
        self.stalled = {k: (float(at), dict(f)) for k, (at, f) in data["stalled"].items()}
        self.down = {k: (float(at), str(b)) for k, (at, b) in data["down"].items()}
        self.gave_up, self.skip_next = set(data["gave_up"]), set(data["skip_next"])
        return True

    def progress(self) -> dict[str, Any]:
        return {"retrying": len(self.attempts), "due": len(self.due), "stalled-timers": len(self.stalled),
                "down": sorted(self.down), "gave-up": len(self.gave_up)}


def compile_policy(cfg: PolicyConfig, catalog: Catalog) -> Policy:
    """ConfigError names the policy and what is wrong."""
    try:
        match = check_match(cfg.match, catalog)
        backend = match.glob.split("/")[0]
        if not any(ch in backend for ch in "*?[") and backend not in RETRY_OPERATION and not cfg.operation:
            raise ConfigError(f"no retry operation known for backend {backend!r}; set operation = \"...\"")
        if cfg.max_attempts < 0 or cfg.backoff < 0 or cfg.stalled_after < 0 or cfg.give_up_after < 0:
            raise ConfigError("max-attempts, backoff, stalled-after and give-up-after must be >= 0")
        bad = sorted(set(cfg.on) - {s.value for s in State})
        if bad:
            raise ConfigError(f"on: unknown state {bad[0]!r} (states: {', '.join(s.value for s in State)})")
        if cfg.operation and catalog.sessions is not None:
            for session, b in catalog.sessions.items():
                if fnmatch.fnmatchcase(f"{b}/{session}", "/".join([*match.glob.split("/"), "*"][:2])):
                    ops = catalog.operations(session)
                    if ops is not None and cfg.operation not in ops:
                        raise ConfigError(f"operation: session {session!r} has no operation {cfg.operation!r}")
    except ConfigError as exc:
        raise ConfigError(f"policy {cfg.name!r}: {exc}") from None
    return Policy(cfg, match)


def compile_policies(cfgs: Sequence[PolicyConfig], catalog: Catalog) -> tuple[list[Policy], dict[str, str]]:
    policies: list[Policy] = []
    rejected: dict[str, str] = {}
    for cfg in cfgs:
        if not cfg.enabled:
            continue
        try:
            policies.append(compile_policy(cfg, catalog))
        except ConfigError as exc:
            rejected[cfg.name] = str(exc)
    return policies, rejected


#: job name -> the spec it was submitted with (QCG retries need it)
SpecLookup = Callable[[str, str], "dict[str, Any] | None"]


def recovery_calls(rec: Recovery, spec_of: SpecLookup, operation: str = "") -> list[CallSpec]:
    """The backend calls for a retry or kill-retry of ``rec.key`` on session ``rec.source``.

    A QCG job is removed and submitted again from the spec the orchestrator saw, else through
    the session's ``resubmit`` (the specs of the jobs that session submitted). FlowbusError when
    the retry cannot be built (a DiFX job without its input path)."""
    s, key, b = rec.source, rec.key, rec.backend
    calls: list[CallSpec] = []
    if rec.kind == "kill-retry":
        kill = KILL_OPERATION.get(b)
        if kill is None:
            raise FlowbusError(f"no kill operation known for backend {b!r}")
        calls.append(CallSpec(session=s, operation=kill, args=[_kill_arg(b, key)]))
    if operation:
        return [*calls, CallSpec(session=s, operation=operation, args=[key])]
    if b == Backend.ECFLOW.value:
        return [*calls, CallSpec(session=s, operation="requeue", args=[key])]
    if b == Backend.QCG.value:
        spec = spec_of(s, key)
        if spec is None:  # the session's own record (jobs it submitted); it names what it lacks
            return [*calls, CallSpec(session=s, operation="resubmit", args=[key])]
        return [*calls, CallSpec(session=s, operation="remove", args=[[key]]),
                CallSpec(session=s, operation="submit", args=[[spec]])]
    if b == Backend.SOMA.value:
        return [*calls, CallSpec(session=s, operation="restart_workflow", args=[int(key.split("/")[0])])]
    if b == Backend.WMS.value:
        attrs = rec.fields.get("attrs") or {}
        wms_id = attrs.get("wms_id") if isinstance(attrs, Mapping) else None
        return [*calls, CallSpec(session=s, operation="restart", args=[str(wms_id or key)])]
    if b == Backend.GUISERVER.value:
        attrs = rec.fields.get("attrs") or {}
        inp = attrs.get("input") if isinstance(attrs, Mapping) else None
        if not inp:
            raise FlowbusError(f"cannot restart DiFX job {key!r}: its .input path is not known from its events")
        state = rec.fields.get("state")
        if rec.kind != "kill-retry" and state not in {s.value for s in State if s.final}:
            calls.append(CallSpec(session=s, operation="stop_job", args=[key]))
        return [*calls, CallSpec(session=s, operation="start_job", args=[inp], kwargs={"force": True})]
    raise FlowbusError(f"no retry operation known for backend {b!r}")


def _kill_arg(backend: str, key: str) -> Any:
    if backend == Backend.QCG.value:
        return [key]
    if backend == Backend.SOMA.value:
        return int(key.split("/", maxsplit=1)[0])
    return key  # wms: the workflow key is its id


__all__ = ["KILL_OPERATION", "RETRY_OPERATION", "Policy", "Recovery", "compile_policies", "compile_policy",
           "recovery_calls"]
