"""Sans-I/O rule engine: condition state machines fed events and clock ticks, returning firings.

No sockets, no threads, no clock reads: :meth:`Engine.feed` takes an event, :meth:`Engine.tick`
takes the time (seconds since the epoch). Time inside the engine is the event's own ``time``
(so a replay after a restart gives the same answers), and feeding an event first runs every
timer that expired before it. Progress (latched children, windows, timers, and per rule the last
seq consumed of every source) dumps to msgpack bytes and loads back: a checkpoint.

Idempotency: every rule keeps, per source, the highest seq it consumed; an event at or below it
(a replay) is ignored, so a rule fires once per triggering event whatever is replayed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from flowbus.bus import Match
from flowbus.schemas import (
    TAGS,
    CallAction,
    ConfigError,
    Event,
    MatchSyntaxError,
    RuleConfig,
    ThenAction,
    When,
    WhenTable,
)

from ._conditions import (
    AbsentNode,
    AllNode,
    AnyNode,
    CountNode,
    MatchNode,
    Node,
    Out,
    SequenceNode,
    Trig,
    event_time,
    trig_of,
)

_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


class Firing(msgspec.Struct, frozen=True):
    """A rule fired: the events that satisfied its condition (the last one completed it)."""

    rule: str
    triggers: list[Trig]
    time: float

    @property
    def event(self) -> dict[str, Any]:
        """Fields of the event that completed the condition."""
        return self.triggers[-1].fields if self.triggers else {}

    @property
    def idempotency_key(self) -> str:
        return self.rule + "|" + ",".join(f"{t.source}:{t.seq}" for t in self.triggers)


# -- compiling config into nodes and actions -------------------------------------------------------


class Catalog:
    """What rules may refer to: session name -> backend, and each session's operations.

    ``operations(session)`` returns the names, or None when they cannot be known here."""

    def __init__(self, sessions: Mapping[str, str] | None = None,
                 operations: Callable[[str], Sequence[str] | None] | None = None) -> None:
        self.sessions = dict(sessions) if sessions is not None else None
        self.operations = operations or (lambda _s: None)


def check_match(text: str, catalog: Catalog) -> Match:
    """Parse a match expression and check it, the sessions it names included (ConfigError)."""
    try:
        m = Match(text)
        if catalog.sessions is not None:
            m.check_sessions(catalog.sessions)
    except MatchSyntaxError as exc:
        raise ConfigError(f"invalid match expression: {exc}") from None
    return m


def build_node(when: When | Mapping[str, Any], catalog: Catalog) -> Node:
    if isinstance(when, Mapping):
        try:
            when = msgspec.convert(dict(when), WhenTable)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid condition: {exc}") from None
    if isinstance(when, str):
        return MatchNode(check_match(when, catalog))
    kinds = [k for k in ("all", "any", "sequence", "count", "absent") if getattr(when, k) is not None]
    if len(kinds) != 1:
        raise ConfigError("a condition table needs exactly one of all, any, sequence, count, absent "
                          f"(got {kinds or 'none'})")
    kind = kinds[0]
    if kind in ("all", "any", "sequence"):
        items = getattr(when, kind)
        if not items:
            raise ConfigError(f"{kind}: needs at least one condition")
        children = [build_node(c, catalog) for c in items]
        return {"all": AllNode, "any": AnyNode, "sequence": SequenceNode}[kind](children)
    if when.within < 0:
        raise ConfigError(f"{kind}: within must be >= 0")
    if kind == "count":
        assert when.count is not None
        if when.n < 1:
            raise ConfigError("count: n must be >= 1")
        return CountNode(build_node(when.count, catalog), when.n, when.within)
    assert when.absent is not None
    if when.after is None:
        raise ConfigError("absent: needs after = <condition> (what starts the timer)")
    if when.within <= 0:
        raise ConfigError("absent: within must be > 0 seconds")
    return AbsentNode(check_match(when.absent, catalog), build_node(when.after, catalog), when.within, when.per_key)


class CallSpec(msgspec.Struct, frozen=True):
    """A backend operation to run: ``Supervisor.call(session, operation, args, kwargs, timeout)``."""

    session: str
    operation: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    timeout: float = 120.0


class PublishSpec(msgspec.Struct, frozen=True):
    """An event to publish: ``type`` is its tag, ``fields`` the rest (envelope added by the host)."""

    type: str
    fields: dict[str, Any]


#: a Python callback action (API users): called with the Firing
FiringCallback = Callable[[Firing], Any]
Action = CallSpec | PublishSpec | FiringCallback


def check_call(call: CallAction | CallSpec, catalog: Catalog) -> CallSpec:
    spec = CallSpec(session=call.session, operation=call.operation, args=list(call.args),
                    kwargs=dict(call.kwargs), timeout=call.timeout)
    if catalog.sessions is not None and spec.session not in catalog.sessions:
        raise ConfigError(f"call: unknown session {spec.session!r} "
                          f"(configured: {', '.join(sorted(catalog.sessions)) or 'none'})")
    ops = catalog.operations(spec.session)
    if ops is not None and spec.operation not in ops:
        raise ConfigError(f"call: session {spec.session!r} has no operation {spec.operation!r} "
                          f"(known: {', '.join(sorted(ops))})")
    return spec


def check_publish(fields: Mapping[str, Any]) -> PublishSpec:
    data = dict(fields)
    tag = str(data.pop("type", "log"))
    cls = TAGS.get(tag)
    if cls is None:
        raise ConfigError(f"publish: unknown event type {tag!r} (known: {', '.join(sorted(TAGS))})")
    known = {f.name for f in msgspec.structs.fields(cls)} - {"source", "backend", "seq", "incarnation", "time"}
    bad = sorted(set(data) - known)
    if bad:
        raise ConfigError(f"publish: {tag} events have no field {bad[0]!r} (fields: {', '.join(sorted(known))})")
    return PublishSpec(type=tag, fields=data)


def build_actions(then: Sequence[ThenAction | CallSpec | PublishSpec | FiringCallback | Mapping[str, Any]],
                  catalog: Catalog) -> list[Action]:
    out: list[Action] = []
    for i, given in enumerate(then):
        try:
            a = msgspec.convert(dict(given), ThenAction) if isinstance(given, Mapping) else given
            if isinstance(a, ThenAction):
                if (a.call is None) == (a.publish is None):
                    raise ConfigError("needs exactly one of call and publish")
                out.append(check_call(a.call, catalog) if a.call is not None else check_publish(a.publish or {}))
            elif isinstance(a, CallSpec):
                out.append(check_call(a, catalog))
            elif isinstance(a, PublishSpec):
                out.append(check_publish({"type": a.type, **a.fields}))
            elif callable(a):
                out.append(a)
            else:
                raise ConfigError(f"not an action: {a!r}")
        except (ConfigError, msgspec.ValidationError) as exc:
            raise ConfigError(f"then[{i}]: {exc}") from None
    return out


# -- substitution ----------------------------------------------------------------------------------


def _lookup(ctx: Mapping[str, Any], path: str) -> Any:
    cur: Any = ctx
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(path)
    return cur


def substitute(value: Any, ctx: Mapping[str, Any]) -> Any:
    """Replace ``{field}`` references in strings (recursively); unknown names stay as written."""
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            try:
                return _lookup(ctx, whole.group(1))
            except KeyError:
                return value

        def one(m: re.Match[str]) -> str:
            try:
                return str(_lookup(ctx, m.group(1)))
            except KeyError:
                return m.group(0)

        return _REF.sub(one, value)
    if isinstance(value, list):
        return [substitute(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, ctx) for k, v in value.items()}
    return value


def context_of(firing: Firing) -> dict[str, Any]:
    return {**firing.event, "rule": firing.rule, "triggers": [t.fields for t in firing.triggers]}


def render(action: Action, firing: Firing) -> Action:
    """The action with the firing's fields substituted."""
    ctx = context_of(firing)
    if isinstance(action, CallSpec):
        return CallSpec(session=action.session, operation=action.operation, args=substitute(action.args, ctx),
                        kwargs=substitute(action.kwargs, ctx), timeout=action.timeout)
    if isinstance(action, PublishSpec):
        fields = substitute(action.fields, ctx)
        fields.setdefault("key", firing.event.get("key", ""))
        return PublishSpec(type=action.type, fields=fields)
    return action


# -- rules and the engine --------------------------------------------------------------------------


class Rule:
    """A compiled rule: its condition, its actions, and per source the last seq consumed."""

    def __init__(self, name: str, node: Node, actions: list[Action], fingerprint: str = "") -> None:
        self.name, self.node, self.actions, self.fingerprint = name, node, actions, fingerprint
        self.hw: dict[str, int] = {}
        self.fired = 0

    def feed(self, ev: Event, now: float) -> list[Firing]:
        if ev.seq:
            if ev.seq <= self.hw.get(ev.source, 0):
                return []
            self.hw[ev.source] = ev.seq
        return self._firings(self.node.feed(ev, trig_of(ev, now), now), now)

    def tick(self, now: float) -> list[Firing]:
        return self._firings(self.node.tick(now), now)

    def _firings(self, outs: Out, now: float) -> list[Firing]:
        self.fired += len(outs)
        return [Firing(rule=self.name, triggers=trigs, time=now) for trigs in outs]


def fingerprint(cfg: RuleConfig) -> str:
    return hashlib.sha256(msgspec.json.encode(cfg)).hexdigest()[:16]


def compile_rule(cfg: RuleConfig, catalog: Catalog) -> Rule:
    """A rule from its config; ConfigError names the rule and what is wrong."""
    try:
        node = build_node(cfg.when, catalog)
        actions = build_actions(cfg.then, catalog)
    except ConfigError as exc:
        raise ConfigError(f"rule {cfg.name!r}: {exc}") from None
    return Rule(cfg.name, node, actions, fingerprint(cfg))


def compile_rules(cfgs: Sequence[RuleConfig], catalog: Catalog) -> tuple[list[Rule], dict[str, str]]:
    """Every valid, enabled rule, and ``{name: why}`` for the rejected ones."""
    rules: list[Rule] = []
    rejected: dict[str, str] = {}
    for cfg in cfgs:
        if not cfg.enabled:
            continue
        try:
            rules.append(compile_rule(cfg, catalog))
        except ConfigError as exc:
            rejected[cfg.name] = str(exc)
    return rules, rejected


class Engine:
    """Rules fed events and ticks. ``now`` only moves forward (the latest event or tick time)."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules: dict[str, Rule] = {r.name: r for r in rules}
        self.now = 0.0

    def add(self, rule: Rule) -> None:
        if rule.name in self.rules:
            raise ConfigError(f"rule {rule.name!r}: a rule of that name exists already")
        self.rules[rule.name] = rule

    def remove(self, name: str) -> None:
        self.rules.pop(name, None)

    def feed(self, ev: Event) -> list[Firing]:
        """Timers that expired before the event, then the event itself."""
        t = event_time(ev, self.now)
        out = self.tick(t) if t > self.now else []
        for rule in list(self.rules.values()):
            out.extend(rule.feed(ev, max(t, self.now)))
        return out

    def tick(self, now: float) -> list[Firing]:
        self.now = max(self.now, now)
        out: list[Firing] = []
        for rule in list(self.rules.values()):
            out.extend(rule.tick(self.now))
        return out

    def deadline(self) -> float | None:
        ds = [d for r in self.rules.values() if (d := r.node.deadline()) is not None]
        return min(ds) if ds else None

    def high_water(self) -> dict[str, int]:
        """Per source, the lowest seq every rule has consumed (where a replay must start after)."""
        out: dict[str, int] = {}
        for r in self.rules.values():
            for s, q in r.hw.items():
                out[s] = min(out.get(s, q), q)
        return out

    def dump(self) -> dict[str, Any]:
        return {"now": self.now, "rules": {n: {"fp": r.fingerprint, "hw": r.hw, "fired": r.fired,
                                              "node": r.node.dump()} for n, r in self.rules.items()}}

    def load(self, data: Mapping[str, Any]) -> list[str]:
        """Restore progress of rules whose definition did not change; the names restored."""
        self.now = max(self.now, float(data.get("now", 0.0)))
        done = []
        for name, st in data.get("rules", {}).items():
            rule = self.rules.get(name)
            if rule is None or st.get("fp") != rule.fingerprint:
                continue
            rule.hw = {str(k): int(v) for k, v in st["hw"].items()}
            rule.fired = int(st.get("fired", 0))
            rule.node.load(st["node"])
            done.append(name)
        return done

    def progress(self) -> dict[str, dict[str, Any]]:
        return {n: {"fired": r.fired, "progress": r.node.progress(), "sources": len(r.hw)}
                for n, r in self.rules.items()}


def dumps(data: Any) -> bytes:
    return msgspec.msgpack.encode(data)


def loads(raw: bytes) -> Any:
    return msgspec.msgpack.decode(raw)


__all__ = [
    "AbsentNode", "Action", "AllNode", "AnyNode", "CallSpec", "Catalog", "CountNode", "Engine", "Firing",
    "FiringCallback", "MatchNode", "Node", "PublishSpec", "Rule", "SequenceNode", "Trig", "build_actions",
    "build_node", "check_match", "compile_rule", "compile_rules", "dumps", "loads", "render", "substitute",
]
