"""Supervisor: places sessions on BackendActors over the Ray nodes, keeps them started, and
moves sessions away from actors that stay unreachable.

Placement (see ``_placement.py``): ``[[ray.placement]]`` groups say which sessions go on how
many actors and what Ray resources / node labels those actors ask for; before any actor is
created the cluster is checked, so a request no node can satisfy is a ConfigError, not an actor
pending forever.

The watchdog pings every actor (all at once, bounded). An actor that Ray restarted (``started``
is False again) is told to ``start()``, which reopens its sessions and resyncs them; sessions
moved to it earlier are added back. An actor that stays unreachable for ``ray.move-after``
seconds (its node died and Ray cannot place it again, it hangs, or it sits behind a network
partition) is quarantined and its sessions are added to the other actors of its group: each
opens under a new incarnation and resyncs from the journal and its backend. The old incarnation
is then fenced by the broker; when the quarantined actor answers again it is ended once it has
let go of its sessions (they learn they are fenced at their next publish), or after a grace
period. It is never told to ``stop()``: that would end backend work the new incarnation adopted.

Rebalancing: a retired actor is created again, empty, once ``check_fit`` finds room for it on
the alive nodes beside the live actors (its node, or capacity, came back). Each watchdog turn
then moves sessions back (``_placement.
rebalance_moves``: home first, then until no two actors of a group differ by two or more), at
most ``ray.rebalance-per-second``: the old actor hands the session over (no command in flight,
polls stopped, published events flushed, backend connection released), then the new one opens
it under a new incarnation and resyncs. ``placement_report()`` lists each move with reason
``rebalance``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgspec
import structlog

from . import _ray  # noqa: F401  (loopback fences before ray)

# isort: split
import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from flowbus.bus import ClientCurve, grant_key_file, load_grant_key, make_grant
from flowbus.schemas import BackendUnavailable, ConfigError, FlowbusConfig, FlowbusError, UnknownSession

from ._backend_actor import BackendActor
from ._placement import ActorPlan, check_fit, make_plan
from ._rebalance import Rebalancer, _Health

log = structlog.get_logger("flowbus.supervisor")

ACTOR_PREFIX = "flowbus-backend-"
SUPERVISOR_NAME = "flowbus-supervisor"
_RAY_NATIVE = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


def plan(config: FlowbusConfig) -> dict[str, list[dict[str, Any]]]:
    """actor name -> session specs (see ``_placement.make_plan``)."""
    return {name: p.specs for name, p in make_plan(config).items()}


def actor_options(p: ActorPlan, max_restarts: int) -> dict[str, Any]:
    """Ray actor options for a plan: its name, resources and node-label selector."""
    opts: dict[str, Any] = {"name": ACTOR_PREFIX + p.name, "max_restarts": max_restarts, "get_if_exists": True}
    res = dict(p.resources)
    for key, opt in _RAY_NATIVE.items():
        if key in res:
            opts[opt] = res.pop(key)
    if res:
        opts["resources"] = res
    if p.node_labels:
        opts["label_selector"] = dict(p.node_labels)
    return opts


class SupervisorImpl(Rebalancer):
    def __init__(self, config_json: bytes, broker_address: str, curve: Any = None) -> None:
        self.config = msgspec.json.decode(config_json, type=FlowbusConfig)
        self.broker_address = broker_address
        self._grant_key_file: str | None = self.config.bus.grant_key_file or None
        # the actors' client keys for a CURVE broker come from the same [bus.curve] table
        self.curve = curve if curve is not None else ClientCurve.from_config(self.config.bus.curve)
        # configuration only here: a plan error is raised by start(), not as an opaque actor death
        self._plan_error: ConfigError | None = None
        try:
            self.plans = make_plan(self.config)
        except ConfigError as exc:
            self.plans, self._plan_error = {}, exc
        self.move_after = float(self.config.ray.move_after)
        self.start_timeout = float(self.config.ray.start_timeout)
        self.actors: dict[str, Any] = {}
        self.groups: dict[str, str] = {name: p.group for name, p in self.plans.items()}
        self.placement: dict[str, str] = {}
        self.specs: dict[str, dict[str, Any]] = {s["name"]: s for p in self.plans.values() for s in p.specs}
        #: where the plan put each session (rebalancing moves sessions back there first)
        self.home: dict[str, str] = {s["name"]: n for n, p in self.plans.items() for s in p.specs}
        self.rebalance_rate = float(self.config.ray.rebalance_per_second)
        self._rb_tokens, self._rb_last = 0.0, time.monotonic()
        self.returned: list[dict[str, Any]] = []
        self._recreate_next = 0.0
        self._creating: dict[str, tuple[Any, Any, float]] = {}
        #: sessions being moved (hand-over, then open): a command waits until the move is done
        self._moving: dict[str, threading.Event] = {}
        self._backoff: dict[str, tuple[float, float]] = {}
        self.restarts: dict[str, int] = {}
        self.moves: list[dict[str, Any]] = []
        self.quarantined: dict[str, dict[str, Any]] = {}
        self.retired: list[dict[str, Any]] = []
        self._health: dict[str, _Health] = {}
        self._qhealth: dict[str, _Health] = {}
        self._started_once: set[str] = set()
        self._pids: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def _grant(self, spec: dict[str, Any]) -> list[Any] | None:
        """The source grant of a session (None when the bus checks no grants). The key is the
        configured ``bus.grant-key-file``, else the file the broker names (readable only by the
        user it belongs to); it is read when needed and never leaves this actor: only grants
        travel, over Ray's authenticated channels, to the actor that opens the session."""
        if self._grant_key_file is None:
            self._grant_key_file = grant_key_file("", self.broker_address, self.curve)
        if not self._grant_key_file:
            return None
        return make_grant(load_grant_key(self._grant_key_file), str(spec["name"]), str(spec["backend"]))

    def _spawn(self, name: str, specs: list[dict[str, Any]], **extra: Any) -> Any:
        """Create the BackendActor of plan ``name`` with these sessions (not started)."""
        opts = {**actor_options(self.plans[name], self.config.ray.max_restarts), **extra}
        return BackendActor.options(**opts).remote(
            name, self.broker_address, specs, self.curve, poll_workers=self.config.ray.poll_workers,
            open_concurrency=self.config.ray.open_concurrency, grants={s["name"]: self._grant(s) for s in specs})

    # -- start ---------------------------------------------------------------------------------------

    def check_cluster(self) -> None:
        """Raise ConfigError when some actor could never be placed on the cluster's alive nodes."""
        check_fit(self.plans, ray.nodes())

    def start(self, timeout: float | None = None) -> dict[str, str]:
        """Check the cluster, create the BackendActors, start them, and start the watchdog
        (idempotent). Raises ConfigError (nothing can place an actor) or FlowbusError (an actor
        was not placed and started within ``timeout``, default ``ray.start-timeout``)."""
        timeout = self.start_timeout if timeout is None else timeout
        if self._plan_error is not None:
            raise self._plan_error
        with self._lock:
            if not self.actors:
                self.check_cluster()
                for name, p in self.plans.items():
                    self.actors[name] = self._spawn(name, p.specs)
                    for s in p.specs:
                        self.placement[s["name"]] = name
            handles = dict(self.actors)
        refs = {name: h.start.remote() for name, h in handles.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout) if refs else ([], [])
        late = [name for name, ref in refs.items() if ref not in ready]
        if late:
            what = "; ".join(self.plans[n].describe() if n in self.plans else n for n in late)
            raise FlowbusError(f"not placed and started within {timeout:g} s: {what}. Ray may have no node with "
                               f"room left for them (see `ray status`), or their sessions did not open")
        for name, ref in refs.items():
            self._pids[name] = ray.get(ref)["pid"]
            self._started_once.add(name)
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="flowbus-watchdog", daemon=True)
            self._watchdog.start()
        return dict(self.placement)

    # -- watchdog ------------------------------------------------------------------------------------

    def _watch(self) -> None:
        period = max(0.2, min(1.0, self.move_after / 5))
        while not self._stop.wait(period):
            try:
                self._tick(timeout=period)
            except Exception as exc:  # noqa: BLE001 - keep watching
                log.error("supervisor.watchdog.failed", error=str(exc)[:300])

    def _tick(self, timeout: float) -> None:
        now = time.monotonic()
        with self._lock:
            live, quarantined = dict(self.actors), {n: q["handle"] for n, q in self.quarantined.items()}
        for table, handles in ((self._health, live), (self._qhealth, quarantined)):
            for name, handle in handles.items():
                h = table.setdefault(name, _Health(last_ok=now))
                if h.ref is None:
                    h.ref, h.sent = handle.ping.remote(), now
        refs = [self._health[n].ref for n in live] + [self._qhealth[n].ref for n in quarantined]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout)[0]) if refs else set()
        now = time.monotonic()
        for name in live:
            self._check_live(name, self._health[name], ready, now)
        for name in quarantined:
            self._check_quarantined(name, self._qhealth[name], ready, now)
        with self._lock:
            failing = [(n, h) for n, h in self._health.items() if n in self.actors and h.failing_since is not None
                       and now - h.failing_since > self.move_after]
        for name, h in failing:
            self._evacuate(name, f"unreachable for {now - (h.failing_since or now):.1f} s")
        if now >= self._recreate_next or self._creating:
            self._recreate_next = now + 5.0
            self._recreate()
        self._rebalance(time.monotonic())

    def _answer(self, h: _Health, ready: set[Any]) -> tuple[bool, Any]:
        """(answered, info or the exception) for the ping in flight, consuming it when answered."""
        if h.ref not in ready:
            return False, None
        ref, h.ref = h.ref, None
        try:
            return True, ray.get(ref, timeout=0)
        except Exception as exc:  # noqa: BLE001 - RayActorError and friends are looked at by the caller
            return True, exc

    def _check_live(self, name: str, h: _Health, ready: set[Any], now: float) -> None:
        answered, info = self._answer(h, ready)
        if not answered:
            if now - h.sent > max(2.0, self.move_after / 3) and h.failing_since is None:
                h.failing_since = h.sent
                log.warning("supervisor.actor.unresponsive", actor=name, waited=round(now - h.sent, 1))
            return
        if isinstance(info, BaseException):
            if h.failing_since is None:
                h.failing_since = now
                log.warning("supervisor.actor.unreachable", actor=name, error=str(info)[:200])
            return
        h.failing_since, h.last_ok, h.info, h.reachable_since = None, now, info, None
        if not info["started"]:
            self._restarted(name, info)

    def _restarted(self, name: str, info: dict[str, Any]) -> None:
        """Ray restarted the actor (constructor ran again): reopen its sessions, add moved ones."""
        self.restarts[name] = self.restarts.get(name, 0) + 1
        log.warning("supervisor.actor.restarted", actor=name, pid=info["pid"])
        handle = self.actors.get(name)
        if handle is None:
            return
        with self._lock:
            owned = [self.specs[s] for s, a in self.placement.items() if a == name]
        try:  # its constructor's sessions may live elsewhere now: open what it owns today
            ray.get(handle.reset.remote(owned, {str(s["name"]): self._grant(s) for s in owned}),
                    timeout=self.start_timeout)
        except Exception as exc:  # noqa: BLE001 - already started (a command came first): add the missing below
            log.warning("supervisor.actor.reset_failed", actor=name, error=str(exc)[:300])
        try:
            info = ray.get(handle.start.remote(), timeout=self.start_timeout)
            self._pids[name] = info["pid"]
        except Exception as exc:  # noqa: BLE001 - the other sessions may be open; add the moved ones anyway
            log.error("supervisor.actor.start_failed", actor=name, error=str(exc)[:300])
            return
        with self._lock:
            missing = [s for s, a in self.placement.items() if a == name and s not in info["sessions"]]
        for s in missing:
            try:
                ray.get(handle.add_session.remote(self.specs[s], self._grant(self.specs[s])),
                        timeout=self.start_timeout)
            except Exception as exc:  # noqa: BLE001 - logged; the other sessions are reopened anyway
                log.error("supervisor.session.reopen_failed", actor=name, session_id=s, error=str(exc)[:300])

    def _targets(self, name: str) -> list[str]:
        """Actors of ``name``'s group that answered their last ping."""
        group = self.groups.get(name)
        return [a for a in self.actors if a != name and self.groups.get(a) == group
                and a in self._health and self._health[a].failing_since is None and self._health[a].info is not None]

    def _evacuate(self, name: str, reason: str) -> None:
        """Quarantine an unreachable actor and add its sessions to the other actors of its group."""
        with self._lock:
            targets = self._targets(name)
            if not targets:
                h = self._health[name]
                if h.reachable_since is None:  # log once per failing period
                    h.reachable_since = time.monotonic()
                    log.error("supervisor.move.no_target", actor=name, group=self.groups.get(name), reason=reason)
                return
            handle = self.actors.pop(name)
            h = self._health.pop(name)
            self.quarantined[name] = {"handle": handle, "since": time.time(), "reason": reason}
            self._qhealth[name] = _Health(ref=h.ref, sent=h.sent)
            sessions = sorted(s for s, a in self.placement.items() if a == name)
        log.warning("supervisor.actor.quarantined", actor=name, reason=reason, sessions=sessions)
        with self._lock:
            load = {a: sum(1 for x in self.placement.values() if x == a) for a in targets}
        chosen: dict[str, str] = {}
        for s in sessions:  # the least loaded sibling first
            target = min(targets, key=lambda a: (load[a], a))
            load[target] += 1
            chosen[s] = target
        t0 = time.monotonic()
        # all at once: each opens under a new incarnation (fencing the old one) and resyncs
        refs = {s: self.actors[t].add_session.remote(self.specs[s], self._grant(self.specs[s]))
                for s, t in chosen.items()}
        ready = (set(ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.start_timeout)[0])
                 if refs else set())
        for s, ref in refs.items():
            move: dict[str, Any] = {"session": s, "from": name, "to": chosen[s], "time": time.time(), "reason": reason}
            try:
                if ref not in ready:
                    raise GetTimeoutError(f"not opened within {self.start_timeout:g} s")
                ray.get(ref, timeout=0)
            except Exception as exc:  # noqa: BLE001 - the session still belongs to the target; status shows it
                move["error"] = str(exc)[:300]
                log.error("supervisor.session.move_failed", session_id=s, to=chosen[s], error=move["error"])
            move["seconds"] = round(time.monotonic() - t0, 3)
            with self._lock:
                self.placement[s] = chosen[s]
                self.moves.append(move)
            log.warning("supervisor.session.moved", session_id=s, frm=name, to=chosen[s], seconds=move["seconds"])

    def _check_quarantined(self, name: str, h: _Health, ready: set[Any], now: float) -> None:
        answered, info = self._answer(h, ready)
        q = self.quarantined[name]
        if not answered:
            if now - h.sent > 20 * self.move_after:
                self._retire(name, "never answered again", None)
            return
        if isinstance(info, ActorDiedError):
            self._retire(name, "dead", None)
        elif isinstance(info, BaseException):
            return
        elif not info["started"]:
            # ended, not taken back: it may hold the one slot its group's restarting actor needs;
            # once the cluster has room for it again beside the live ones, _recreate() makes it anew
            self._retire(name, "restarted by Ray (holds no session)", info)
        elif not info["sessions"]:
            self._retire(name, "released its sessions (fenced)", info)
        else:
            h.reachable_since = h.reachable_since or now
            q["holding"] = info["sessions"]
            if now - h.reachable_since > max(2 * self.move_after, 10.0):
                self._retire(name, f"still holds {info['sessions']} after the grace period", info)

    def _retire(self, name: str, reason: str, info: Any) -> None:
        with self._lock:
            q = self.quarantined.pop(name, None)
            self._qhealth.pop(name, None)
        if q is None:
            return
        try:
            ray.kill(q["handle"], no_restart=True)
        except Exception as exc:  # noqa: BLE001 - retired either way; the failure is logged
            log.warning("supervisor.actor.kill_failed", actor=name, error=str(exc)[:200])
        self.retired.append({"actor": name, "reason": reason, "quarantined": q["reason"], "time": time.time(),
                             "pid": info.get("pid") if isinstance(info, dict) else None})
        log.warning("supervisor.actor.retired", actor=name, reason=reason)

    # -- API -----------------------------------------------------------------------------------------

    def where(self, session: str) -> str:
        """The actor (its Ray name) hosting ``session``."""
        with self._lock:
            if session not in self.placement:
                raise UnknownSession(session)
            return ACTOR_PREFIX + self.placement[session]

    def sessions(self) -> dict[str, str]:
        with self._lock:
            return dict(self.placement)

    def status(self) -> dict[str, Any]:
        """Per actor: its last ping (or the error), restarts, group, and ``state`` (``running``,
        ``failing`` or ``quarantined``)."""
        with self._lock:
            live, quarantined = dict(self.actors), dict(self.quarantined)
        refs = {name: h.ping.remote() for name, h in live.items()}
        ready = set(ray.wait(list(refs.values()), num_returns=len(refs), timeout=5)[0]) if refs else set()
        out: dict[str, Any] = {}
        now = time.monotonic()
        for name, ref in refs.items():
            try:
                if ref not in ready:
                    raise GetTimeoutError("no answer within 5 s")
                out[name] = ray.get(ref, timeout=0)
            except Exception as exc:  # noqa: BLE001 - reported as that actor's entry
                out[name] = {"error": str(exc)[:200]}
            h = self._health.get(name)
            failing = h is not None and h.failing_since is not None
            out[name].update(restarts=self.restarts.get(name, 0), group=self.groups.get(name),
                             state="failing" if failing else "running",
                             failing_for=round(now - h.failing_since, 1) if h and h.failing_since else 0.0)
        for name, q in quarantined.items():
            out[name] = {"state": "quarantined", "reason": q["reason"], "group": self.groups.get(name),
                         "sessions": q.get("holding", []), "restarts": self.restarts.get(name, 0)}
        return out

    def placement_report(self) -> dict[str, Any]:
        """Plans (group, resources, node labels), moves (each with its ``reason``: why the actor was
        left, or ``rebalance``), quarantined, retired and returned actors, each session's home."""
        with self._lock:
            return {"plans": {n: {"group": p.group, "resources": p.resources, "node_labels": p.node_labels}
                              for n, p in self.plans.items()},
                    "placement": dict(self.placement), "moves": list(self.moves),
                    "quarantined": {n: {"reason": q["reason"], "holding": q.get("holding", [])}
                                    for n, q in self.quarantined.items()},
                    "retired": list(self.retired), "restarts": dict(self.restarts),
                    "returned": list(self.returned), "home": dict(self.home)}

    def _route(self, session: str, wait: float) -> tuple[str, Any]:
        """(actor name, handle) hosting ``session``; while it is being moved, after the move (at
        most ``wait`` s)."""
        with self._lock:
            moving = self._moving.get(session)
        if moving is not None:
            moving.wait(wait)
        with self._lock:
            name = self.placement.get(session, "")
            handle = self.actors.get(name)
        if handle is None:
            raise UnknownSession(session, sorted(self.placement))
        return name, handle

    def bound(self, session: str, operation: str, args: list[Any], kwargs: dict[str, Any]) -> float | None:
        """The operation's own time bound, asked of the actor hosting ``session``."""
        _, handle = self._route(session, 30)
        result: float | None = ray.get(handle.bound.remote(session, operation, args, kwargs), timeout=30)
        return result

    def limit(self, session: str, operation: str, args: list[Any], kwargs: dict[str, Any], timeout: float) -> float:
        """``timeout``, raised to the operation's own bound (+ a margin) when that is longer."""
        own = self.bound(session, operation, args, kwargs)
        return max(timeout, own + BOUND_MARGIN_S) if own is not None else timeout

    def call(self, session: str, operation: str, args: list[Any], kwargs: dict[str, Any],
             timeout: float = 120.0) -> Any:
        """Run an operation on the actor hosting ``session``. A command that meets a move (the old
        actor refuses it while handing over, or no longer has the session) is sent once more to
        the session's new actor, after the move."""
        deadline = time.monotonic() + timeout
        name, handle = self._route(session, timeout)
        try:
            return ray.get(handle.call.remote(session, operation, *args, **kwargs), timeout=timeout)
        except RayTaskError as exc:
            if not isinstance(exc.cause, (BackendUnavailable, UnknownSession)):
                raise
            with self._lock:
                moved = session in self._moving or self.placement.get(session) != name
            if not moved:
                raise
        left = max(1.0, deadline - time.monotonic())
        _, handle = self._route(session, left)
        return ray.get(handle.call.remote(session, operation, *args, **kwargs), timeout=left)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every session gracefully, then end the actors. Quarantined actors (and actors
        being created again, still empty) are only ended: their sessions belong to newer incarnations."""
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=10)
        with self._lock:
            actors, quarantined = dict(self.actors), dict(self.quarantined)
            creating = [h for h, _, _ in self._creating.values()]  # empty, being created again
            self.actors.clear()
            self.quarantined.clear()
            self._creating.clear()
        refs = [h.stop.remote() for n, h in actors.items() if n in self._started_once]
        if refs:
            ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            for ref in ready:
                try:
                    ray.get(ref, timeout=0)
                except Exception as exc:  # noqa: BLE001 - kill them anyway
                    log.error("supervisor.stop.failed", error=str(exc)[:300])
            if late:
                log.error("supervisor.stop.timeout", actors=len(late), timeout=timeout)
        for h in [*actors.values(), *(q["handle"] for q in quarantined.values()), *creating]:
            try:
                ray.kill(h, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - kill them all anyway; logged
                log.warning("supervisor.actor.kill_failed", error=str(exc)[:200])


Supervisor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)(SupervisorImpl)  # type: ignore[call-overload]  # Ray stubs lack actor options


def supervisor_options(name: str | None = SUPERVISOR_NAME) -> dict[str, Any]:
    """Options that keep the Supervisor on this driver's node (the head, for a ``ray://`` driver),
    not on a worker node whose death it is there to handle."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict[str, Any] = {"scheduling_strategy": NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False)}
    if name:
        opts["name"] = name
    return opts


def actor_pid(handle: Any, timeout: float = 10.0) -> int:
    """The OS pid of a BackendActor (for fault-injection tests)."""
    return int(ray.get(handle.ping.remote(), timeout=timeout)["pid"])


def wait_started(handle: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``ping`` until the actor reports started (after a restart)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = ray.get(handle.ping.remote(), timeout=5)
            if last["started"]:
                return last  # type: ignore[no-any-return]  # ping() answers a dict
        except (RayActorError, GetTimeoutError) as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"actor did not report started within {timeout:g} s (last: {last})")


#: what a command waits beyond an operation's own bound (the round trip, journaling its events)
BOUND_MARGIN_S = 10.0


def call_through(supervisor: Any, session: str, operation: str, args: list[Any], kwargs: dict[str, Any],
                 timeout: float) -> Any:
    """Run an operation through the Supervisor actor ``supervisor``, waiting at least the
    operation's own bound (its ``timeout`` argument), never less than ``timeout``."""
    limit = ray.get(supervisor.limit.remote(session, operation, args, kwargs, timeout), timeout=60)
    return ray.get(supervisor.call.remote(session, operation, args, kwargs, limit), timeout=limit + 10)
