"""The Orchestrator's core: rules and recovery policies run against the bus, without Ray.

:class:`OrchestratorCore` is the I/O around the sans-I/O engine (:mod:`._engine`,
:mod:`._policies`): one thread reads a :class:`~flowbus.bus.Subscriber`, feeds events and clock
ticks, runs the actions through a ``caller`` (the Supervisor, for the Ray actor; anything for
in-process use), publishes ``RuleFired``/``RecoveryAttempted``/``RecoveryGaveUp``/``ErrorEvent``
under its own source, and checkpoints progress.

Checkpoint: a msgpack file in the state directory, written atomically (temp file, fsync,
rename) *before* the actions of a firing run, and at most every ``checkpoint_every`` seconds
otherwise. A file rather than events in the journal: the journal is a bounded ring that evicts
old events (and a snapshot keeps only stateful families), while the checkpoint must survive
however long the stream runs; and it needs no new event type. On start with a checkpoint the
subscription replays the whole journal, ordered by event time, and each rule skips what it
consumed (per source, the last seq): no event fires a rule twice. The checkpoint written before
actions run lists them as in flight; after a crash in that window they are not run again, and
the resumed orchestrator publishes an ``ErrorEvent`` (key ``restart``) for each (at most once,
never lost silently). A journal that restarted from scratch (a source's last seq below what we
consumed) resets that source. Actions run one after the other in the loop thread: a slow call
delays the events and timers behind it (never loses them).
"""

from __future__ import annotations

import heapq
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from flowbus.bus import Client, ClientCurve, Publisher, Subscriber
from flowbus.schemas import (
    TAGS,
    Backend,
    ErrorEvent,
    Event,
    FlowbusConfig,
    Forgotten,
    LogLine,
    RecoveryAttempted,
    RecoveryGaveUp,
    RuleFired,
    SessionConfig,
)

from ._engine import CallSpec, Catalog, Engine, Firing, PublishSpec, Rule, dumps, loads, render
from ._policies import Policy, Recovery, recovery_calls

log = structlog.get_logger("flowbus.orchestrator")

#: the Ray actor name of the Orchestrator ``flowbus up`` runs (flowbus.actors.Orchestrator); defined
#: here, beside its source name, so that code without Ray (flowbus.rules) can name it
ORCHESTRATOR_NAME = "flowbus-orchestrator"
ORCHESTRATOR_SOURCE = "orchestrator"
CHECKPOINT_FILE = "checkpoint.msgpack"
#: QCG job specs remembered per session for retries (oldest dropped first); a spec also goes
#: when its job is forgotten (``Forgotten``: the session's retention passed)
MAX_SPECS = 100_000

#: runs one backend call; raises on failure
Caller = Callable[[CallSpec], Any]


def error_fields(exc: BaseException) -> dict[str, Any]:
    """ErrorEvent fields for an exception (a Ray task error is unwrapped to its cause)."""
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, BaseException) else exc
    text = "".join(traceback.format_exception_only(err)).strip()
    return {"error_type": f"{type(err).__module__}.{type(err).__qualname__}", "message": text[:2000],
            "args": [str(a)[:500] for a in getattr(err, "args", ())]}


def merge_by_time(events: list[Event]) -> list[Event]:
    """Interleave sources by event time, never reordering the events of one source (their seq
    order is what idempotency relies on, whatever their clocks say)."""
    per: dict[str, list[Event]] = {}
    for ev in events:
        per.setdefault(ev.source, []).append(ev)
    return list(heapq.merge(*per.values(), key=lambda e: e.time))


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class OrchestratorCore:
    """Engine + policies on a live bus. ``start()`` returns once the subscription is live."""

    def __init__(self, address: str, *, rules: list[Rule] | None = None, policies: list[Policy] | None = None,
                 rejected: dict[str, str] | None = None, caller: Caller | None = None,
                 checkpoint: str | os.PathLike[str] | None = None, source: str = ORCHESTRATOR_SOURCE,
                 curve: ClientCurve | None = None, sessions: dict[str, str] | None = None,
                 checkpoint_every: float = 1.0, prefixes: tuple[str, ...] = ("",),
                 since: dict[str, int] | None = None, grant: list[Any] | None = None) -> None:
        self.address, self.curve, self.source = address, curve, source
        #: the source grant when flowbus runs this core (its own Orchestrator actor)
        self.grant = grant
        #: on a first start (no checkpoint): per source, the last seq that counts as already
        #: consumed (``flowbus up`` takes the marks before it opens the sessions, so nothing they
        #: publish while the orchestrator starts is missed); None = whatever the journal holds
        self.since = dict(since) if since is not None else None
        self.engine = Engine(rules or [])
        self.policies = {p.name: p for p in policies or []}
        self.rejected = dict(rejected or {})
        self.caller = caller
        self.sessions = dict(sessions or {})
        self.checkpoint_path = Path(checkpoint) if checkpoint else None
        self.checkpoint_every = checkpoint_every
        self.prefixes = prefixes
        #: (session, job) -> the spec a QCG job was submitted with (for remove+resubmit)
        self.specs: dict[str, dict[str, dict[str, Any]]] = {}
        self.stats: dict[str, int] = {"events": 0, "fired": 0, "actions": 0, "errors": 0, "recoveries": 0,
                                      "gave_up": 0, "checkpoints": 0}
        self.restored: dict[str, Any] = {}
        #: firings and recoveries whose actions are running (in the checkpoint, for a crash report)
        self.in_flight: list[str] = []
        self._interrupted: list[str] = []
        self.lock = threading.RLock()  # engine, policies and specs (the loop and API callers)
        self._pub: Publisher | None = None
        self._sub: Subscriber | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dirty = False
        self._last_ckpt = 0.0
        self.log = log.bind(source=source)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        raw = self._read_checkpoint()
        if raw is not None:
            self._restore(raw)
        pub = self._pub = Publisher(self.address, curve=self.curve)
        pub.open_source(self.source, Backend.FLOWBUS.value, grant=self.grant)
        for what in self._interrupted:
            self.log.error("orchestrator.interrupted", what=what)
            self._publish(ErrorEvent(source=self.source, backend="flowbus", key="restart", operation="resume",
                                     error_type="flowbus.Interrupted",
                                     message=f"{what}: interrupted by a restart while its actions ran; not repeated"))
        self._interrupted = []
        for name, why in sorted(self.rejected.items()):
            self.log.error("rule.rejected", rule=name, error=why)
            self._publish(ErrorEvent(source=self.source, backend="flowbus", key=name, error_type="flowbus.ConfigError",
                                     message=why, operation="load"))
        catch_up = raw is not None or self.since is not None
        sub = self._sub = Subscriber(self.address, self.prefixes, start="journal" if catch_up else "live",
                                     curve=self.curve)
        # what the journal held when we started (or the marks given as ``since``) counts as consumed
        # for every rule and policy that has no progress of its own (new, changed, or a first
        # start): they react to what comes next
        self._baseline(self.since if raw is None and self.since is not None else sub.confirmed())
        if catch_up:
            if raw is not None:
                self._reset_restarted_sources()
            replay = merge_by_time(sub.recv_many(0, limit=10**9))
            self.log.info("orchestrator.resumed", replayed=len(replay), restored=self.restored)
            for ev in replay:
                self._on_event(ev)
        with self.lock:
            self._write_checkpoint()  # from now on a restart resumes (replays) instead of starting live
        self._thread = threading.Thread(target=self._run, name="flowbus-orchestrator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self.lock:
            self._write_checkpoint()
        if self._sub is not None:
            self._sub.close()
        if self._pub is not None:
            try:
                self._pub.flush(5)
            except Exception as exc:  # noqa: BLE001 - closing anyway
                self.log.warning("orchestrator.flush_failed", error=str(exc)[:200])
            self._pub.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        sub = self._sub
        assert sub is not None
        while not self._stop.is_set():
            deadline = self._deadline()
            wait = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.time()))
            try:
                events = sub.recv_many(wait)
                for ev in events:
                    self._on_event(ev)
                self._on_tick(time.time())
                if self._dirty and time.monotonic() - self._last_ckpt >= self.checkpoint_every:
                    with self.lock:
                        self._write_checkpoint()
            except Exception as exc:  # noqa: BLE001 - the loop must go on; the failure is visible
                self.stats["errors"] += 1
                self.log.error("orchestrator.loop_failed", error="".join(traceback.format_exception(exc))[-2000:])
                self._publish(ErrorEvent(source=self.source, backend="flowbus", key="loop", operation="loop",
                                         **error_fields(exc)))
                self._stop.wait(0.5)

    def _deadline(self) -> float | None:
        with self.lock:
            ds = [d for d in [self.engine.deadline(), *(p.deadline() for p in self.policies.values())] if d is not None]
        return min(ds) if ds else None

    def _on_event(self, ev: Event) -> None:
        with self.lock:
            self.stats["events"] += 1
            if isinstance(ev, Forgotten):
                self._forget(ev)
            now = self.engine.now
            firings = self.engine.feed(ev)
            now = max(now, self.engine.now)
            recs = [r for p in self.policies.values() for r in p.tick(now)]
            recs += [r for p in self.policies.values() for r in p.feed(ev, now)]
            self._dirty = True
            self._before(firings, recs)
        self._execute(firings, recs)

    def _on_tick(self, now: float) -> None:
        with self.lock:
            firings = self.engine.tick(now)
            recs = [r for p in self.policies.values() for r in p.tick(now)]
            self._before(firings, recs)
        self._execute(firings, recs)

    def _before(self, firings: list[Firing], recs: list[Recovery]) -> None:
        """Checkpoint the progress that produced these firings and recoveries, with them listed as
        in flight, before anything runs: a crash now neither repeats them nor loses them silently."""
        if not firings and not recs:
            return
        self.in_flight = [f"rule {f.rule} ({f.idempotency_key})" for f in firings]
        self.in_flight += [f"policy {r.policy} {r.kind} of {r.source}/{r.key} attempt {r.attempt}" for r in recs]
        self._dirty = True
        self._write_checkpoint()

    # -- actions --------------------------------------------------------------------------------------

    def _execute(self, firings: list[Firing], recs: list[Recovery]) -> None:
        for firing in firings:
            self._fire(firing)
        for rec in recs:
            self._recover(rec)
        if firings or recs:
            with self.lock:
                self.in_flight = []
                self._dirty = True

    def _fire(self, firing: Firing) -> None:
        self.stats["fired"] += 1
        last = firing.triggers[-1] if firing.triggers else None
        self.log.info("rule.fired", rule=firing.rule, key=firing.idempotency_key)
        self._publish(RuleFired(source=self.source, backend="flowbus", key=firing.rule, rule=firing.rule,
                                trigger_seq=last.seq if last else 0,
                                detail=f"triggered by {', '.join(f'{t.source}:{t.seq}' for t in firing.triggers)}"
                                       + (f" (key {last.fields.get('key', '')})" if last else "")))
        rule = self.engine.rules.get(firing.rule)
        for i, action in enumerate(rule.actions if rule else []):
            try:
                self.run_action(render(action, firing), firing)
            except Exception as exc:  # noqa: BLE001 - reported on the bus; the rest of this firing is skipped
                self.stats["errors"] += 1
                op = (f"{action.session}.{action.operation}" if isinstance(action, CallSpec)
                      else f"publish {action.type}" if isinstance(action, PublishSpec) else "callback")
                fields = error_fields(exc)
                self.log.error("rule.action_failed", rule=firing.rule, action=i, operation=op, error=fields["message"])
                self._publish(ErrorEvent(source=self.source, backend="flowbus", key=firing.rule,
                                         operation=f"rule {firing.rule} then[{i}]: {op}", **fields))
                break

    def run_action(self, action: Any, firing: Firing | None = None) -> Any:
        self.stats["actions"] += 1
        if isinstance(action, CallSpec):
            return self.call(action)
        if isinstance(action, PublishSpec):
            cls = TAGS[action.type]
            ev = msgspec.convert({**action.fields, "type": action.type, "source": self.source, "backend": "flowbus"},
                                 cls)
            self._publish(ev)
            return None
        return action(firing)

    def call(self, spec: CallSpec) -> Any:
        """Run one backend call through the caller; QCG submissions are remembered for retries."""
        if self.caller is None:
            raise RuntimeError(f"no caller configured: cannot run {spec.session}.{spec.operation}")
        self.log.info("action.call.started", session=spec.session, operation=spec.operation)
        result = self.caller(spec)
        self.log.info("action.call.complete", session=spec.session, operation=spec.operation)
        if spec.operation == "submit" and self.sessions.get(spec.session) == Backend.QCG.value and spec.args:
            jobs = spec.args[0]
            with self.lock:
                book = self.specs.setdefault(spec.session, {})
                for job in jobs if isinstance(jobs, list) else []:
                    if isinstance(job, dict) and isinstance(job.get("name"), str):
                        book.pop(job["name"], None)  # a reused name is the newest
                        book[job["name"]] = msgspec.to_builtins(job)
                while len(book) > MAX_SPECS:
                    del book[next(iter(book))]
                self._dirty = True
        return result

    def _forget(self, ev: Forgotten) -> None:
        """A session forgot a finished resource: so does every policy, and its spec goes (unless
        a retry of it is still due)."""
        due = False
        for p in self.policies.values():
            due = p.forget(ev.source, ev.key) or due
        book = self.specs.get(ev.source)
        if book is not None and not due:
            book.pop(ev.key, None)
        self.stats["forgotten"] = self.stats.get("forgotten", 0) + 1

    def limits(self) -> dict[str, Any]:
        """The checkpoint's bounds and how much of them is used."""
        return {"specs": {"limit_per_session": MAX_SPECS, "used": sum(len(b) for b in self.specs.values())},
                "policy_keys": {"used": sum(p.size() for p in self.policies.values()),
                                "bounded_by": "session retention (Forgotten) and policy timers"}}

    def spec_of(self, session: str, job: str) -> dict[str, Any] | None:
        with self.lock:
            return self.specs.get(session, {}).get(job)

    def _recover(self, rec: Recovery) -> None:
        key = f"{rec.source}/{rec.key}" if rec.key else rec.source
        if rec.kind == "gave-up":
            self.stats["gave_up"] += 1
            self.log.warning("recovery.gave_up", policy=rec.policy, key=key, reason=rec.reason)
            self._publish(RecoveryGaveUp(source=self.source, backend="flowbus", key=key, attempts=rec.attempt,
                                         reason=f"policy {rec.policy}: {rec.reason}"))
            return
        if rec.kind == "alert":
            self.log.warning("recovery.stalled", policy=rec.policy, key=key, reason=rec.reason)
            self._publish(LogLine(source=self.source, backend="flowbus", key=key, level="alert",
                                  message=f"policy {rec.policy}: stalled: {rec.reason}"))
            return
        self.stats["recoveries"] += 1
        policy = self.policies.get(rec.policy)
        done: list[str] = []
        try:
            calls = recovery_calls(rec, self.spec_of, policy.cfg.operation if policy else "")
            for c in calls:
                self.call(c)
                done.append(c.operation)
        except Exception as exc:  # noqa: BLE001 - reported; the policy decides what comes next
            fields = error_fields(exc)
            self.log.error("recovery.failed", policy=rec.policy, key=key, attempt=rec.attempt, error=fields["message"])
            self._publish(RecoveryAttempted(source=self.source, backend="flowbus", key=key, action=rec.kind,
                                            attempt=rec.attempt, reason=rec.reason, ok=False,
                                            detail=f"policy {rec.policy}: {' + '.join(done) or 'nothing'} done; "
                                                   f"{fields['message'][:500]}"))
            self._publish(ErrorEvent(source=self.source, backend="flowbus", key=key,
                                     operation=f"policy {rec.policy} {rec.kind}", **fields))
            if policy is not None:
                with self.lock:
                    more = policy.failed(rec, time.time(), fields["message"][:200])
                    self._dirty = True
                for r in more:
                    self._recover(r)
            return
        self._publish(RecoveryAttempted(source=self.source, backend="flowbus", key=key, action=rec.kind,
                                        attempt=rec.attempt, reason=rec.reason, ok=True,
                                        detail=f"policy {rec.policy}: {' + '.join(done)}"))

    def _publish(self, ev: Event) -> None:
        if self._pub is None:
            return
        self._pub.publish(ev)

    # -- checkpoint -----------------------------------------------------------------------------------

    def _read_checkpoint(self) -> dict[str, Any] | None:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return None
        try:
            data = loads(self.checkpoint_path.read_bytes())
            return data if isinstance(data, dict) else None
        except (OSError, msgspec.DecodeError) as exc:
            self.log.error("checkpoint.unreadable", path=str(self.checkpoint_path), error=str(exc))
            return None

    def _restore(self, data: dict[str, Any]) -> None:
        with self.lock:
            rules = self.engine.load(data.get("engine", {}))
            pols = [n for n, st in data.get("policies", {}).items() if n in self.policies and self.policies[n].load(st)]
            self.specs = {s: dict(b) for s, b in data.get("specs", {}).items()}
            self._interrupted = [str(x) for x in data.get("in_flight", [])]
            self.restored = {"rules": rules, "policies": pols}

    def _baseline(self, confirmed: dict[str, int]) -> None:
        restored = self.restored.get("rules", []), self.restored.get("policies", [])
        with self.lock:
            for r in self.engine.rules.values():
                if r.name not in restored[0]:
                    r.hw = dict(confirmed)
            for p in self.policies.values():
                if p.name not in restored[1]:
                    p.hw = dict(confirmed)

    def _reset_restarted_sources(self) -> None:
        """A journal that started again from seq 1 (``--fresh``) must not be skipped as replayed."""
        try:
            with Client(self.address, curve=self.curve) as c:
                marks = c.marks()
        except Exception as exc:  # noqa: BLE001 - then nothing is reset
            self.log.warning("orchestrator.marks_failed", error=str(exc)[:200])
            return
        with self.lock:
            holders: list[dict[str, int]] = [r.hw for r in self.engine.rules.values()]
            holders += [p.hw for p in self.policies.values()]
            for hw in holders:
                for source in list(hw):
                    mark = marks.get(source)
                    if mark is not None and int(mark[2]) < hw[source]:
                        del hw[source]

    def _write_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            self._dirty = False
            return
        data = {"engine": self.engine.dump(), "policies": {n: p.dump() for n, p in self.policies.items()},
                "specs": self.specs, "in_flight": self.in_flight, "written": time.time()}
        write_atomic(self.checkpoint_path, dumps(data))
        self.stats["checkpoints"] += 1
        self._dirty = False
        self._last_ckpt = time.monotonic()

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"rules": self.engine.progress(), "policies": {n: p.progress() for n, p in self.policies.items()},
                    "rejected": dict(self.rejected), "stats": dict(self.stats), "running": self.running,
                    "restored": self.restored, "limits": self.limits()}


def catalog_for(config: FlowbusConfig) -> Catalog:
    """Sessions by name and, per session, the operations its adapter accepts."""
    by_name: dict[str, SessionConfig] = {s.name: s for s in config.sessions}
    cache: dict[str, list[str] | None] = {}

    def operations(session: str) -> list[str] | None:
        if session not in cache:
            try:
                from flowbus.services import session_for

                cache[session] = list(session_for(by_name[session]).operations())
            except Exception as exc:  # noqa: BLE001 - an adapter that cannot load: operations unknown here
                log.warning("orchestrator.operations_unknown", session=session, error=str(exc)[:200])
                cache[session] = None
        return cache[session]

    return Catalog({s.name: str(s.__struct_config__.tag) for s in config.sessions}, operations)


__all__ = ["CHECKPOINT_FILE", "ORCHESTRATOR_NAME", "ORCHESTRATOR_SOURCE", "Caller", "OrchestratorCore", "catalog_for",
           "error_fields", "merge_by_time", "write_atomic"]
