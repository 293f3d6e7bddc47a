"""Condition state machines of the rule engine (sans-I/O): fed events and ticks, they return one
list of triggering events per satisfaction, and dump/load their progress as plain data.

Time is the event's own ``time`` (seconds), so a replay gives the same answers as the first run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from flowbus.bus import Match
from flowbus.schemas import Event


class Trig(msgspec.Struct, frozen=True):
    """One event that contributed to a firing: its identity and its fields (for substitution)."""

    source: str
    seq: int
    time: float
    fields: dict[str, Any]


def event_time(ev: Event, default: float) -> float:
    return ev.time / 1e9 if ev.time else default


def trig_of(ev: Event, now: float) -> Trig:
    return Trig(source=ev.source, seq=ev.seq, time=now, fields=msgspec.to_builtins(ev))


Out = list[list[Trig]]


# -- condition nodes -------------------------------------------------------------------------------


class Node:
    """A condition: ``feed``/``tick`` return one trigger list per satisfaction."""

    def feed(self, ev: Event, trig: Trig, now: float) -> Out:
        raise NotImplementedError

    def tick(self, now: float) -> Out:
        return []

    def deadline(self) -> float | None:
        return None

    def dump(self) -> Any:
        return None

    def load(self, data: Any) -> None:
        pass

    def progress(self) -> str:
        return ""


def _trigs(data: Any) -> list[Trig]:
    return msgspec.convert(data, list[Trig])


class MatchNode(Node):
    def __init__(self, match: Match) -> None:
        self.match = match

    def feed(self, ev: Event, trig: Trig, now: float) -> Out:
        return [[trig]] if self.match(ev) else []


class _Parent(Node):
    def __init__(self, children: list[Node]) -> None:
        self.children = children

    def deadline(self) -> float | None:
        ds = [d for c in self.children if (d := c.deadline()) is not None]
        return min(ds) if ds else None


class AllNode(_Parent):
    def __init__(self, children: list[Node]) -> None:
        super().__init__(children)
        self.latched: list[list[Trig] | None] = [None] * len(children)

    def _take(self, outs: list[Out]) -> Out:
        for i, out in enumerate(outs):
            if out:
                self.latched[i] = out[-1]
        if all(x is not None for x in self.latched):
            got = [t for x in self.latched if x is not None for t in x]
            self.latched = [None] * len(self.children)
            return [got]
        return []

    def feed(self, ev: Event, trig: Trig, now: float) -> Out:
        return self._take([c.feed(ev, trig, now) for c in self.children])

    def tick(self, now: float) -> Out:
        return self._take([c.tick(now) for c in self.children])

    def dump(self) -> Any:
        return {"latched": self.latched, "children": [c.dump() for c in self.children]}

    def load(self, data: Any) -> None:
        self.latched = [None if x is None else _trigs(x) for x in data["latched"]]
        for c, d in zip(self.children, data["children"], strict=True):
            c.load(d)

    def progress(self) -> str:
        return f"{sum(x is not None for x in self.latched)}/{len(self.children)} satisfied"


class AnyNode(_Parent):
    def feed(self, ev: Event, trig: Trig, now: float) -> Out:
        return [t for c in self.children for t in c.feed(ev, trig, now)]

    def tick(self, now: float) -> Out:
        return [t for c in self.children for t in c.tick(now)]

    def dump(self) -> Any:
        return [c.dump() for c in self.children]

    def load(self, data: Any) -> None:
        for c, d in zip(self.children, data, strict=True):
            c.load(d)


class SequenceNode(_Parent):
    """Only the current step sees events and ticks; each step is satisfied strictly after the previous."""

    def __init__(self, children: list[Node]) -> None:
        super().__init__(children)
        self.step = 0
        self.got: list[Trig] = []

    def _take(self, out: Out) -> Out:
        if not out:
            return []
        self.got.extend(out[0])
        self.step += 1
        if self.step == len(self.children):
            got, self.got, self.step = self.got, [], 0
            return [got]
        return []

    def feed(self, ev: Event, trig: Trig, now: float) -> Out:
        return self._take(self.children[self.step].feed(ev, trig, now))

    def tick(self, now: float) -> Out:
        return self._take(self.children[self.step].tick(now))

    def deadline(self) -> float | None:
        return self.children[self.step].deadline()

    def dump(self) -> Any:
        return {"step": self.step, "got": self.got, "children": [c.dump() for c in self.children]}

    def load(self, data: Any) -> None:
        self.step, self.got = int(data["step"]), _trigs(data["got"])
        for c, d in zip(self.children, data["children"], strict=True):
            c.load(d)

    def progress(self) -> str:
        return f"step {self.step}/{len(self.children)}"


class CountNode(Node):
    def __init__(self, child: Node, n: int, within: float) -> None:
        self.child, self.n, self.within = child, n, within
        self.window: list[tuple[float, list[Trig]]] = []

    def _take(self, out: Out, now: float) -> Out:
        for trigs in out:
            self.window.append((now, trigs))
        if self.within > 0:
            self.window = [(t, x) for t, x in self.window if t > now - self.within]
        if len(self.window) >= self.n:
            got = [t for _, x in self.window for t in x]
            self.window = []
            return [got]
        return []

    def feed(self, ev: Event, trig: Trig, now: float) -> Out:
        return self._take(self.child.feed(ev, trig, now), now)

    def tick(self, now: float) -> Out:
        return self._take(self.child.tick(now), now)

    def deadline(self) -> float | None:
        return self.child.deadline()

    def dump(self) -> Any:
        return {"window": [[t, x] for t, x in self.window], "child": self.child.dump()}

    def load(self, data: Any) -> None:
        self.window = [(float(t), _trigs(x)) for t, x in data["window"]]
        self.child.load(data["child"])

    def progress(self) -> str:
        return f"{len(self.window)}/{self.n} counted"


class AbsentNode(Node):
    """``after`` starts a timer; an ``absent`` event (same source and key when ``per_key``) stops it."""

    def __init__(self, absent: Match, after: Node, within: float, per_key: bool) -> None:
        self.absent, self.after, self.within, self.per_key = absent, after, within, per_key
        self.timers: dict[str, tuple[float, list[Trig]]] = {}

    def _corr(self, fields: Mapping[str, Any]) -> str:
        return f"{fields.get('source', '')}\x00{fields.get('key', '')}" if self.per_key else ""

    def feed(self, ev: Event, trig: Trig, now: float) -> Out:
        if self.timers and self.absent(ev):
            self.timers.pop(self._corr(trig.fields), None)
        for trigs in self.after.feed(ev, trig, now):
            self.timers[self._corr(trigs[-1].fields)] = (now + self.within, trigs)
        return []

    def tick(self, now: float) -> Out:
        for trigs in self.after.tick(now):
            self.timers[self._corr(trigs[-1].fields)] = (now + self.within, trigs)
        due = sorted((d, k) for k, (d, _) in self.timers.items() if d <= now)
        return [self.timers.pop(k)[1] for _, k in due]

    def deadline(self) -> float | None:
        ds = [d for d, _ in self.timers.values()]
        child = self.after.deadline()
        if child is not None:
            ds.append(child)
        return min(ds) if ds else None

    def dump(self) -> Any:
        return {"timers": {k: [d, x] for k, (d, x) in self.timers.items()}, "after": self.after.dump()}

    def load(self, data: Any) -> None:
        self.timers = {k: (float(d), _trigs(x)) for k, (d, x) in data["timers"].items()}
        self.after.load(data["after"])

    def progress(self) -> str:
        return f"{len(self.timers)} timer(s) pending"


__all__ = ["AbsentNode", "AllNode", "AnyNode", "CountNode", "MatchNode", "Node", "Out", "SequenceNode", "Trig",
           "event_time", "trig_of"]
