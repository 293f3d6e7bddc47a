"""The Supervisor's rebalancing (a mixin of ``SupervisorImpl``, see ``_supervisor.py``).

A retired actor is created again, empty, once ``check_fit`` finds room for it on the alive nodes
beside the live actors (its node, or capacity, came back); creations never block the watchdog.
Each watchdog turn then moves sessions back (``_placement.rebalance_moves``: home first, then
until no two actors of a group differ by two or more), at most ``ray.rebalance-per-second``. A
move is a hand-over: the old actor lets go of the session (no command in flight, polls stopped,
published events flushed, backend connection released, source unregistered), then the new one
opens it under a new incarnation and resyncs; ``placement_report()`` lists it with reason
``rebalance``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from . import _ray  # noqa: F401  (loopback fences before ray)

# isort: split
import ray
from ray.exceptions import RayTaskError

from flowbus.schemas import ConfigError, FlowbusConfig

from ._placement import ActorPlan, check_fit, rebalance_moves

log = structlog.get_logger("flowbus.supervisor")


@dataclass
class _Health:
    ref: Any = None
    sent: float = 0.0
    failing_since: float | None = None
    last_ok: float = 0.0
    info: Any = None
    reachable_since: float | None = None


class Rebalancer:
    """What SupervisorImpl sets and provides (declared here for the type checker)."""

    config: FlowbusConfig
    plans: dict[str, ActorPlan]
    actors: dict[str, Any]
    groups: dict[str, str]
    placement: dict[str, str]
    specs: dict[str, dict[str, Any]]
    home: dict[str, str]
    moves: list[dict[str, Any]]
    quarantined: dict[str, dict[str, Any]]
    retired: list[dict[str, Any]]
    returned: list[dict[str, Any]]
    rebalance_rate: float
    start_timeout: float
    _health: dict[str, _Health]
    _pids: dict[str, int]
    _started_once: set[str]
    _creating: dict[str, tuple[Any, Any, float]]
    _moving: dict[str, threading.Event]
    _backoff: dict[str, tuple[float, float]]
    _rb_tokens: float
    _rb_last: float
    _lock: threading.RLock

    def _spawn(self, name: str, specs: list[dict[str, Any]], **extra: Any) -> Any:
        raise NotImplementedError

    def _grant(self, spec: dict[str, Any]) -> list[Any] | None:
        raise NotImplementedError

    def _recreate(self) -> None:
        """Create again, empty, each retired actor that fits the alive nodes beside the live ones
        (its node came back); rebalancing fills it. Never blocks the watchdog: a creation is
        looked at again each turn; one not started within ``start-timeout`` is ended and tried
        again later (5 s, doubling up to 5 min)."""
        now = time.monotonic()
        for name, (handle, ref, t0) in list(self._creating.items()):
            if ray.wait([ref], timeout=0)[0]:
                del self._creating[name]
                try:
                    self._recreated(name, handle, ray.get(ref, timeout=0))
                    continue
                except Exception as exc:  # noqa: BLE001 - logged; tried again later
                    error = str(exc)[:300]
            elif now - t0 > self.start_timeout:
                del self._creating[name]
                error = f"not placed and started within {self.start_timeout:g} s"
            else:
                continue
            self._recreate_failed(name, error, handle)
        with self._lock:
            gone = [n for n in self.plans if n not in self.actors and n not in self.quarantined
                    and n not in self._creating and self._backoff.get(n, (0.0, 0.0))[0] <= now]
            live = {n: self.plans[n] for n in [*self.actors, *self._creating]}
        if not gone or self.rebalance_rate <= 0:
            return
        nodes = ray.nodes()
        for name in gone:
            try:
                check_fit({**live, name: self.plans[name]}, nodes)
            except ConfigError:
                continue
            try:  # the retired actor's name may still be taken for a moment: tried again later
                handle = self._spawn(name, [], get_if_exists=False)
            except Exception as exc:  # noqa: BLE001 - logged; tried again later
                self._recreate_failed(name, str(exc)[:300], None)
                continue
            self._creating[name] = (handle, handle.start.remote(), now)
            live[name] = self.plans[name]

    def _recreated(self, name: str, handle: Any, info: dict[str, Any]) -> None:
        with self._lock:
            self.actors[name] = handle
            self._health[name] = _Health(last_ok=time.monotonic(), info=info)
            self._pids[name] = info["pid"]
            self._started_once.add(name)
            self._backoff.pop(name, None)
            why = next((r["reason"] for r in reversed(self.retired) if r["actor"] == name), "")
            self.returned.append({"actor": name, "retired": why, "time": time.time(), "pid": info["pid"]})
        log.warning("supervisor.actor.recreated", actor=name, pid=info["pid"])

    def _recreate_failed(self, name: str, error: str, handle: Any) -> None:
        delay = min(300.0, 2 * self._backoff.get(name, (0.0, 2.5))[1])
        self._backoff[name] = (time.monotonic() + delay, delay)
        log.warning("supervisor.actor.recreate_failed", actor=name, error=error, retry_in=delay)
        if handle is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - logged; the name is tried again later
                log.warning("supervisor.actor.kill_failed", actor=name, error=str(exc)[:200])

    def _rebalance(self, now: float) -> None:
        """Move sessions back toward balance, at most ``rebalance_rate`` per second."""
        if self.rebalance_rate <= 0:
            return
        self._rb_tokens = min(max(1.0, self.rebalance_rate),
                              self._rb_tokens + (now - self._rb_last) * self.rebalance_rate)
        self._rb_last = now
        if self._rb_tokens < 1:
            return
        with self._lock:
            ready = {a for a, h in self._health.items() if a in self.actors and h.failing_since is None
                     and h.info is not None and h.info.get("started")}
            moves = rebalance_moves(self.home, dict(self.placement), self.groups, ready, int(self._rb_tokens))
        for session, frm, to in moves:
            self._rb_tokens -= 1
            self._move(session, frm, to, "rebalance")
        if moves:
            self._rb_last = time.monotonic()  # the moves' own time is not budget

    def _move(self, session: str, frm: str, to: str, reason: str) -> None:
        """Hand ``session`` over from ``frm`` (it refuses while a command runs: then it stays) and
        open it on ``to`` under a new incarnation."""
        with self._lock:
            src, dst = self.actors.get(frm), self.actors.get(to)
        if src is None or dst is None:
            return
        t0 = time.monotonic()
        move: dict[str, Any] = {"session": session, "from": frm, "to": to, "time": time.time(), "reason": reason}
        done = self._moving[session] = threading.Event()  # Supervisor.call waits for it
        try:
            self._hand_over_and_open(session, src, dst, move)
        except RayTaskError as exc:  # it answered: a command in flight (or not hosted): not moved now
            log.info("supervisor.move.deferred", session_id=session, frm=frm, error=str(exc.cause)[:200])
            return
        finally:
            with self._lock:
                if "deferred" not in move:
                    self.placement[session] = to
                self._moving.pop(session, None)
            done.set()
        move["seconds"] = round(time.monotonic() - t0, 3)
        with self._lock:
            self.moves.append(move)
        log.warning("supervisor.session.moved", session_id=session, frm=frm, to=to, reason=reason,
                    seconds=move["seconds"])

    def _hand_over_and_open(self, session: str, src: Any, dst: Any, move: dict[str, Any]) -> None:
        try:
            ray.get(src.hand_over.remote(session, self.start_timeout / 2), timeout=self.start_timeout)
        except RayTaskError:
            move["deferred"] = True
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable: the new incarnation fences it anyway
            move["hand_over_error"] = str(exc)[:300]
        spec = self.specs[session]
        try:
            ray.get(dst.add_session.remote(spec, self._grant(spec)), timeout=self.start_timeout)
        except Exception as exc:  # noqa: BLE001 - the session belongs to the target; status shows it
            move["error"] = str(exc)[:300]
            log.error("supervisor.session.move_failed", session_id=session, to=move["to"], error=move["error"])
