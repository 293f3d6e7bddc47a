"""The node attributes beyond events, meters, labels, variables, repeats, limits, flags,
expressions and time attributes (those are read in :mod:`._tree`): each becomes one
``(path, kind, name) -> value`` entry, so adding, changing and deleting it publishes an
``AttributeChanged`` (deleted: ``value=None``).

| kind | name | value |
|---|---|---|
| ``inlimit`` | ``<limit node path>:<limit name>`` | the tokens it takes (int) |
| ``queue`` | the queue's name | the current step (text) |
| ``generic`` | the attribute's name | its values, space separated |
| ``verify`` | the attribute's text (``verify complete:3``) | True |
| ``late`` | ``late`` | the attribute's text (``late -s +00:15 -c +02:00``) |
| ``zombie_policy`` | the zombie type (``ecf_passwd``...) | the attribute's text |
| ``autocancel``/``autoarchive``/``autorestore`` | the same word | the attribute's text |
| ``defstatus`` | ``defstatus`` | the default state, only when not ``queued`` |
| ``clock`` | ``clock`` or ``end_clock`` (suites) | the clock's text |
"""

from __future__ import annotations

from typing import Any

import ecflow

Scalar = str | int | float | bool | None
AttrKey = tuple[str, str, str]


def _text(value: Any) -> str | None:
    """The attribute's text, or None when the node has none (the getters return None)."""
    return None if value is None else str(value).strip()


def read_extra(node: Any, path: str, attrs: dict[AttrKey, Scalar]) -> None:
    """Add the attributes of ``node`` listed in the module docstring to ``attrs``."""
    for inlimit in node.inlimits:
        attrs[(path, "inlimit", f"{inlimit.path_to_node()}:{inlimit.name()}")] = int(inlimit.tokens())
    for queue in node.queues:
        attrs[(path, "queue", queue.name())] = str(queue.value())
    for generic in node.generics:
        attrs[(path, "generic", generic.name())] = " ".join(str(v) for v in generic.values)
    for verify in node.verifies:
        attrs[(path, "verify", str(verify))] = True
    for zombie in node.zombies:
        attrs[(path, "zombie_policy", str(zombie.zombie_type()))] = str(zombie)
    for kind, value in (("late", node.get_late()), ("autocancel", node.get_autocancel()),
                        ("autoarchive", node.get_autoarchive()), ("autorestore", node.get_autorestore())):
        text = _text(value)
        if text is not None:
            attrs[(path, kind, kind)] = text
    defstatus = str(node.get_defstatus())
    if defstatus != "queued":
        attrs[(path, "defstatus", "defstatus")] = defstatus
    if isinstance(node, ecflow.Suite):
        for name, clock in (("clock", node.get_clock()), ("end_clock", node.get_end_clock())):
            text = _text(clock)
            if text is not None:
                attrs[(path, "clock", name)] = text


__all__ = ["read_extra"]
