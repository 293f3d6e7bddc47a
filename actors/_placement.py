"""Placement: which BackendActor hosts which session, and whether the cluster can run them.

Pure functions over the config and over what ``ray.nodes()`` reports (no Ray calls here), so
they are tested without a cluster; the Supervisor does the I/O. The one exception is
:func:`probe_address`, a bounded TCP connect that keeps ``ray.init`` from hanging on an
unreachable cluster.
"""

from __future__ import annotations

import fnmatch
import math
import socket
from dataclasses import dataclass, field
from typing import Any

import msgspec

from flowbus.schemas import ConfigError, FlowbusConfig, PlacementConfig

DEFAULT_GROUP = "default"
_EPS = 1e-9


@dataclass
class ActorPlan:
    """One BackendActor: its group, what it asks Ray for, and the sessions it starts with."""

    name: str
    group: str
    resources: dict[str, float] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)
    specs: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"resources {self.resources}" if self.resources else "",
                 f"node-labels {self.node_labels}" if self.node_labels else ""]
        return f"actor {self.name!r} (group {self.group!r}{''.join(', ' + p for p in parts if p)})"


def group_of(session_name: str, backend: str, groups: list[PlacementConfig]) -> PlacementConfig | None:
    """The first group whose ``sessions`` globs match the name or whose ``backends`` list the backend."""
    for grp in groups:
        if backend in grp.backends or any(fnmatch.fnmatchcase(session_name, g) for g in grp.sessions):
            return grp
    return None


def make_plan(config: FlowbusConfig) -> dict[str, ActorPlan]:
    """Actor name -> plan. Sessions naming an ``actor`` share that actor (in their group); the
    others are spread round-robin over the group's ``actors`` (the default group: ``ray.actors``,
    or consecutive chunks of ``ray.sessions-per-actor``). Actors that would get no session are
    not created."""
    ray = config.ray
    members: dict[str, list[dict[str, Any]]] = {}
    by_name = {g.name: g for g in ray.placement}
    for session in config.sessions:
        grp = group_of(session.name, str(type(session).__struct_config__.tag), ray.placement)
        members.setdefault(grp.name if grp else DEFAULT_GROUP, []).append(msgspec.to_builtins(session))
    plans: dict[str, ActorPlan] = {}
    for gname, specs in members.items():
        grp = by_name.get(gname)
        res, labels = (dict(grp.resources), dict(grp.node_labels)) if grp else ({}, {})

        def put(actor: str, spec: dict[str, Any], gname: str = gname, res: dict[str, float] = res,
                labels: dict[str, str] = labels) -> None:
            plan = plans.get(actor)
            if plan is None:
                plan = plans[actor] = ActorPlan(actor, gname, dict(res), dict(labels))
            elif plan.group != gname:
                raise ConfigError(f"sessions: actor {actor!r} is shared by sessions of placement groups "
                                  f"{plan.group!r} and {gname!r}; give them one group")
            plan.specs.append(spec)

        free = [s for s in specs if not s.get("actor")]
        for s in specs:
            if s.get("actor"):
                put(s["actor"], s)
        if grp is not None:
            n = grp.actors
            for i, s in enumerate(free):
                put(f"{gname}-{i % n}", s)
        elif ray.actors > 0:
            for i, s in enumerate(free):
                put(f"{gname}-{i % ray.actors}", s)
        else:
            per = max(1, ray.sessions_per_actor)
            for i, s in enumerate(free):
                put(f"{gname}-{i // per}", s)
    return plans


def node_slots(node: dict[str, Any], resources: dict[str, float], labels: dict[str, str]) -> int:
    """How many actors asking for ``resources`` fit on ``node`` (an entry of ``ray.nodes()``)."""
    if not node.get("Alive", False):
        return 0
    have_labels = node.get("Labels") or {}
    if any(have_labels.get(k) != v for k, v in labels.items()):
        return 0
    if not resources:
        return 1_000_000
    have: dict[str, float] = node.get("Resources") or {}
    return min(math.floor(have.get(r, 0.0) / amount + _EPS) for r, amount in resources.items())


def check_fit(plans: dict[str, ActorPlan], nodes: list[dict[str, Any]]) -> None:
    """Raise ConfigError naming the group and what is missing when some actor could never be
    placed (Ray would leave it pending forever). Totals are counted, first fit, largest first."""
    alive = [n for n in nodes if n.get("Alive", False)]
    left: dict[int, dict[str, float]] = {i: dict(n.get("Resources") or {}) for i, n in enumerate(alive)}
    for plan in sorted(plans.values(), key=lambda p: (-sum(p.resources.values()), p.name)):
        labelled = [i for i, n in enumerate(alive) if node_slots(n, {}, plan.node_labels)]
        if plan.node_labels and not labelled:
            known = sorted({f"{k}={v}" for n in alive for k, v in (n.get("Labels") or {}).items()
                            if not k.startswith("ray.io/")})
            raise ConfigError(f"ray.placement: {plan.describe()}: no alive Ray node has the labels "
                              f"{plan.node_labels} (node labels in the cluster: {', '.join(known) or 'none'})")
        for res, amount in plan.resources.items():
            total = sum((alive[i].get("Resources") or {}).get(res, 0.0) for i in labelled)
            if total <= 0:
                raise ConfigError(f"ray.placement: {plan.describe()}: no alive Ray node"
                                  f"{' with those labels' if plan.node_labels else ''} offers the resource {res!r}")
            if total + _EPS < amount:
                raise ConfigError(f"ray.placement: {plan.describe()}: asks for {res}={amount:g}, the cluster "
                                  f"has {total:g} in all")
        spot = next((i for i in labelled
                     if all(left[i].get(r, 0.0) + _EPS >= a for r, a in plan.resources.items())), None)
        if spot is None:
            need = sum(1 for p in plans.values() if p.group == plan.group)
            raise ConfigError(f"ray.placement: group {plan.group!r}: {need} actor(s) asking for {plan.resources} "
                              f"each do not fit in the cluster (no node has room left for {plan.describe()})")
        for r, a in plan.resources.items():
            left[spot][r] = left[spot].get(r, 0.0) - a


def rebalance_moves(home: dict[str, str], placement: dict[str, str], groups: dict[str, str],
                    ready: set[str], limit: int) -> list[tuple[str, str, str]]:
    """Up to ``limit`` moves ``(session, from, to)`` that bring a group back into balance, each
    between two ``ready`` actors of one group (``groups``: actor -> group; sessions on an actor
    that is not ready stay where they are):

    1. a session away from its ``home`` actor (where the plan put it) goes home when home holds
       fewer sessions than where it is now;
    2. then, while two actors of a group differ by two sessions or more, one moves from the most
       to the least loaded (a session away from home first, then by name).

    Pure: the caller applies the moves, at its own rate."""
    load = dict.fromkeys(ready, 0)
    for a in placement.values():
        if a in load:
            load[a] += 1
    where = dict(placement)
    moves: list[tuple[str, str, str]] = []

    def apply(s: str, frm: str, to: str) -> None:
        moves.append((s, frm, to))
        where[s] = to
        load[frm] -= 1
        load[to] += 1

    for s in sorted(where):
        if len(moves) >= limit:
            return moves
        cur, dest = where[s], home.get(s)
        if (dest is not None and dest != cur and cur in ready and dest in ready
                and groups.get(cur) == groups.get(dest) and load[dest] < load[cur]):
            apply(s, cur, dest)
    for grp in sorted({groups.get(a) for a in ready}, key=str):
        members = sorted(a for a in ready if groups.get(a) == grp)
        while len(moves) < limit and members:
            most = max(members, key=lambda a: (load[a], a))
            least = min(members, key=lambda a: (load[a], a))
            if load[most] - load[least] < 2:
                break
            s = min((x for x, a in where.items() if a == most), key=lambda x: (home.get(x) == most, x))
            apply(s, most, least)
    return moves


def probe_address(address: str, timeout: float) -> None:
    """Raise ConnectionError unless ``address`` (``host:port``, ``ray://host:port``) accepts a TCP
    connection within ``timeout`` seconds; ``ray.init`` itself waits ~80 s before giving up."""
    target = address.removeprefix("ray://").rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"ray address {address!r}: expected host:port, ray://host:port, auto or local")
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as exc:
        raise ConnectionError(f"ray address {address!r}: nothing answers at {host}:{port} within {timeout:g} s "
                              f"({exc.strerror or exc})") from exc
