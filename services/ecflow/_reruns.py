"""Transitions that two reads of the same state hide (see :func:`._tree.moved`).

A node found in the same display state with a later state change time (the server's, 1 s
resolution), or a task with a new try number or a new job run, went through other states
between two polls: it was requeued or retried and ended where it was. A complete task has no
job password left, and a task can go round within one second: then only its try number or the
rule below tells. A task's family
and suite went through states too, unless another child held that state all along: ecFlow
computes a family's state from its children (aborted over active over submitted over queued
over complete), so a family stays ``aborted`` while a requeued child runs if a sibling stays
aborted, and leaves it otherwise. :func:`ancestors_round` applies that rule bottom-up (a family
found to have gone round counts as such a child of its suite). A suspended node shows
``suspended`` whatever its children do: it never goes round this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol


class Obs(Protocol):
    @property
    def native(self) -> str: ...
    @property
    def try_no(self) -> int: ...
    @property
    def run(self) -> str: ...
    @property
    def since(self) -> str: ...


def went_round(old: Obs | None, new: Obs) -> bool:
    """Same display state, left and reached again: a new try number, a new job run or a new state
    change time. A run token or time unknown on one side (first sight, an older journal) is not a change."""
    if old is None or old.native != new.native:
        return False
    return (old.try_no != new.try_no or bool(old.run and new.run and old.run != new.run)
            or bool(old.since and new.since and old.since != new.since))


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


def ancestors_round(round_paths: Iterable[str], before: Callable[[str], Obs | None],
                    after: Mapping[str, Obs], children: Callable[[str], set[str]]) -> list[str]:
    """The families and suites above ``round_paths`` that went round as well, deepest first.

    ``before(path)`` is a node's state at the last read, ``after`` every node's state now and
    ``children(path)`` the child paths of a node. A candidate is in the same display state before
    and after (otherwise it is published as a plain transition) and not suspended; it went round
    when one of its children did and none held that state both before and after without going round."""
    gone = set(round_paths)
    candidates: set[str] = set()
    for path in gone:
        parent = _parent(path)
        while parent:
            candidates.add(parent)
            parent = _parent(parent)
    out: list[str] = []
    for path in sorted(candidates, key=lambda p: p.count("/"), reverse=True):
        if path in gone:  # found going round by itself (its own state change time)
            continue
        old, new = before(path), after.get(path)
        if old is None or new is None or old.native != new.native or new.native == "suspended":
            continue
        kids = children(path)
        if not kids & gone:
            continue
        held = False
        for kid in kids - gone:
            was, now = before(kid), after.get(kid)
            if was is not None and now is not None and was.native == now.native == new.native:
                held = True
                break
        if not held:
            gone.add(path)
            out.append(path)
    return out


__all__ = ["ancestors_round", "went_round"]
