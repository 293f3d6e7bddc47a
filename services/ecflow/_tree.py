"""What an :class:`~flowbus.services.ecflow.EcflowSession` knows of one server's tree, and the
diff that turns a client-side ``Defs`` (after ``sync_local``) into flowbus events.

Keys are absolute node paths (``/suite/family/task``). The server itself is the key ``/``: its
state (``RUNNING``/``HALTED``/``SHUTDOWN``) is a ``StateChanged`` with ``state`` ACTIVE for
RUNNING and SUSPENDED for HALTED and SHUTDOWN, and its suites are ``AttributeChanged`` with
``kind="suite"`` (``value`` True while the suite is loaded, False once deleted).

A node's attributes are ``(path, kind, name) -> value``: events, meters, labels, variables,
the repeat's current value, limits (``limit`` and ``limit_max``), the ``late``/``zombie`` flags
(present only while set), trigger/complete expressions and time attributes. One that disappears
is published with ``value=None`` (a flag with ``False``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ecflow

from flowbus.schemas import AttributeChanged, Event, Observed, State, StateChanged

from ._attrs import read_extra
from ._reruns import ancestors_round, went_round

#: the key of the server itself
SERVER_KEY = "/"

_NATIVE = {
    "unknown": State.UNKNOWN,
    "queued": State.QUEUED,
    "submitted": State.SUBMITTED,
    "active": State.ACTIVE,
    "complete": State.COMPLETE,
    "aborted": State.ABORTED,
    "suspended": State.SUSPENDED,
}
_SERVER = {"RUNNING": State.ACTIVE, "HALTED": State.SUSPENDED, "SHUTDOWN": State.SUSPENDED}

Scalar = str | int | float | bool | None
#: node flags published as ``AttributeChanged(kind="flag")``
_FLAGS = (("late", ecflow.FlagType.late), ("zombie", ecflow.FlagType.zombie))
AttrKey = tuple[str, str, str]  # (node path, kind, name)


@dataclass(frozen=True)
class NodeObs:
    """One node as last seen: ecFlow's display state, try number, aborted reason, for a task a
    token of its current job run (new at each submission), and the server's time of the node's
    last state change (1 s resolution): see :func:`moved`."""

    native: str
    try_no: int = 0
    reason: str = ""
    run: str = ""
    since: str = ""


def moved(old: NodeObs | None, new: NodeObs) -> bool:
    """Whether ``new`` is a transition to publish. The same state with a new job run means the
    task went through other states between two reads (aborted, requeued, aborted again within
    one poll): that is a transition too, or a retry policy would miss the second abort (see
    :mod:`._reruns`, which also finds the families and suites that went round with it)."""
    if old is None or (old.native, old.try_no, old.reason) != (new.native, new.try_no, new.reason):
        return True
    return went_round(old, new)


@dataclass
class Snapshot:
    """What one read of the client's defs saw (all of it, or only the changed paths)."""

    full: bool
    nodes: dict[str, NodeObs] = field(default_factory=dict)
    attrs: dict[AttrKey, Scalar] = field(default_factory=dict)
    #: the paths read (partial reads) that no longer exist
    gone: list[str] = field(default_factory=list)
    server: str = ""
    suites: list[str] = field(default_factory=list)


def state_of(native: str) -> State:
    return _NATIVE.get(native, State.UNKNOWN)


def _read_node(node: Any, snap: Snapshot) -> None:
    path = node.get_abs_node_path()
    native = str(node.get_dstate())
    try_no, reason, run = 0, "", ""
    if isinstance(node, ecflow.Submittable):
        try_no = int(node.get_int_try_no())
        if native == "aborted":
            reason = node.get_aborted_reason()
        run = _run_token(node)
    since = str(node.get_state_change_time())
    snap.nodes[path] = NodeObs(native, try_no, reason, run, "" if since == "not-a-date-time" else since)
    for ev in node.events:
        snap.attrs[(path, "event", ev.name_or_number())] = bool(ev.value())
    for meter in node.meters:
        snap.attrs[(path, "meter", meter.name())] = int(meter.value())
    for label in node.labels:
        snap.attrs[(path, "label", label.name())] = label.new_value() or label.value()
    _read_more(node, path, snap.attrs)


def _read_more(node: Any, path: str, attrs: dict[AttrKey, Scalar]) -> None:
    """Variables, the repeat, limits, the late and zombie flags, expressions, time attributes and
    the rest (:mod:`._attrs`)."""
    for var in node.variables:
        attrs[(path, "variable", var.name())] = var.value()
    repeat = node.get_repeat()
    if not repeat.empty():
        attrs[(path, "repeat", repeat.name())] = _repeat_value(node, repeat)
    for limit in node.limits:
        attrs[(path, "limit", limit.name())] = int(limit.value())
        attrs[(path, "limit_max", limit.name())] = int(limit.limit())
    flag = node.get_flag()
    for name, kind in _FLAGS:  # only while set: a cleared flag is published False (see Tree.diff)
        if flag.is_set(kind):
            attrs[(path, "flag", name)] = True
    for kind, expr in (("trigger", node.get_trigger()), ("complete", node.get_complete())):
        if expr is not None:
            attrs[(path, kind, "expression")] = str(expr)
    for kind, items in (("time", node.times), ("today", node.todays), ("date", node.dates), ("day", node.days),
                        ("cron", node.crons)):
        for item in items:
            attrs[(path, kind, str(item))] = True
    read_extra(node, path, attrs)


def _repeat_value(node: Any, repeat: Any) -> Scalar:
    """The current value: an int for integer, date and day repeats, the text for enumerated and
    string repeats (whose ``value()`` is only the index; the client's generated variable holding
    the text is stale after an incremental sync until it is updated)."""
    index = int(repeat.value())
    if not str(repeat).startswith(("repeat enumerated", "repeat string")):
        return index
    node.update_generated_variables()
    var = node.find_gen_variable(repeat.name())
    return index if var.empty() else str(var.value())


def _run_token(task: Any) -> str:
    """The job run a task is on: the server draws a new jobs password (ECF_PASS) at every
    submission, and the job's process id (ECF_RID) comes with its init. Kept as a digest: the
    password itself lets a process talk to the server as the job."""
    passwd, rid = task.get_jobs_password(), task.get_process_or_remote_id()
    if not passwd and not rid:
        return ""
    return hashlib.blake2s(f"{passwd}\0{rid}".encode(), digest_size=8).hexdigest()


def _read_server(defs: Any, snap: Snapshot) -> None:
    snap.server = str(defs.get_server_state())
    snap.suites = [s.name() for s in defs.suites]


def read_full(defs: Any) -> Snapshot:
    """Every node of ``defs`` (the client's copy after a full sync)."""
    snap = Snapshot(full=True)
    if defs is None:
        return snap
    _read_server(defs, snap)
    for node in defs.get_all_nodes():
        _read_node(node, snap)
    return snap


def read_paths(defs: Any, paths: Iterable[str], known_children: Callable[[str], set[str]] | None = None) -> Snapshot:
    """Only ``paths`` (``changed_node_paths`` after an incremental sync), plus the server.

    ecFlow reports a node added under, or removed from, a parent that stays (``plug``, ``delete``
    of a task) only as the parent's path: with ``known_children`` (the child paths last seen of a
    node) a new child's whole subtree is read and a vanished child is recorded gone."""
    snap = Snapshot(full=False)
    if defs is None:
        return read_full(defs)
    _read_server(defs, snap)
    for path in dict.fromkeys(paths):
        if path == SERVER_KEY:
            continue
        node = defs.find_abs_node(path)
        if node is None:  # careful: bool(task) is False
            snap.gone.append(path)
            continue
        _read_node(node, snap)
        if known_children is None:
            continue
        known = known_children(path)
        current = set()
        for child in node.nodes:
            child_path = child.get_abs_node_path()
            current.add(child_path)
            if child_path not in known:
                _read_node(child, snap)
                for below in child.get_all_nodes():
                    _read_node(below, snap)
        snap.gone.extend(sorted(known - current))
    return snap


def server_pid(defs: Any) -> str:
    """The server's ECF_PID: it changes when the server restarts ("" when unknown)."""
    if defs is None:
        return ""
    for var in defs.server_variables:
        if var.name() == "ECF_PID":
            return str(var.value())
    return ""


def _present(ev: AttributeChanged) -> bool:
    """Whether a journal event says the attribute exists: not deleted (None), not a cleared flag."""
    return ev.value is not None and not (ev.kind == "flag" and ev.value is False)


class Tree:
    """The last published state of every node, attribute, suite and of the server."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes: dict[str, NodeObs] = {}
        self.attrs: dict[AttrKey, Scalar] = {}
        self.suites: set[str] = set()
        self.server = ""
        #: parent path -> the child paths known (suites are children of the server's suite list)
        self.kids: dict[str, set[str]] = {}

    def children(self, path: str) -> set[str]:
        """The child paths of ``path`` last seen."""
        return self.kids.get(path, set())

    def _put(self, path: str, obs: NodeObs) -> None:
        if path not in self.nodes:
            self.kids.setdefault(path.rsplit("/", 1)[0], set()).add(path)
        self.nodes[path] = obs

    def _pop(self, path: str) -> NodeObs:
        parent = path.rsplit("/", 1)[0]
        self.kids.get(parent, set()).discard(path)
        return self.nodes.pop(path)

    def seed(self, known: Mapping[str, Event]) -> None:
        """Start from the bus journal's latest events for this source."""
        for ev in known.values():
            if isinstance(ev, StateChanged) and ev.key == SERVER_KEY:
                self.server = ev.native
            elif isinstance(ev, StateChanged) and ev.key.startswith("/") and ev.native:
                run, since = ev.attrs.get("run", ""), ev.attrs.get("since", "")
                self._put(ev.key, NodeObs(ev.native, ev.try_no, ev.detail if ev.native == "aborted" else "",
                                          run if isinstance(run, str) else "", since if isinstance(since, str) else ""))
            elif isinstance(ev, AttributeChanged) and ev.key == SERVER_KEY and ev.kind == "suite":
                if ev.value:
                    self.suites.add(ev.name)
            elif isinstance(ev, AttributeChanged) and ev.key.startswith("/") and _present(ev) and ev.kind != "zombie":
                self.attrs[(ev.key, ev.kind, ev.name)] = ev.value

    def diff(self, snap: Snapshot, observed: Observed,
             gone_reason: str = "removed from the ecFlow server") -> list[Event]:
        """Record ``snap`` and return the events that differ from what was known, in tree order:
        server state, suites added, each node's state then its attributes, then removals."""
        out: list[Event] = []
        if snap.server and snap.server != self.server:
            out.append(StateChanged(source=self.source, backend="ecflow", key=SERVER_KEY, observed=observed,
                                    state=_SERVER.get(snap.server, State.UNKNOWN), native=snap.server,
                                    previous=_SERVER.get(self.server) if self.server else None,
                                    native_previous=self.server))
            self.server = snap.server
        suites = set(snap.suites)
        for name in snap.suites:
            if name not in self.suites:
                out.append(self._attr(SERVER_KEY, "suite", name, True, None, observed))
        for name in sorted(self.suites - suites):
            out.append(self._attr(SERVER_KEY, "suite", name, False, True, observed))
        self.suites = suites
        by_node: dict[str, list[tuple[AttrKey, Scalar]]] = {}
        for akey, value in snap.attrs.items():
            by_node.setdefault(akey[0], []).append((akey, value))
        known_by_node: dict[str, list[AttrKey]] = {}  # one pass: a scan of self.attrs per node is quadratic
        for akey in self.attrs:
            if akey[0] in snap.nodes:
                known_by_node.setdefault(akey[0], []).append(akey)
        prior: dict[str, NodeObs | None] = {}  # the nodes changed by this read, as they were
        round_paths: list[str] = []
        for path, obs in snap.nodes.items():
            old = self.nodes.get(path)
            if moved(old, obs):
                rerun = went_round(old, obs)
                if rerun:
                    round_paths.append(path)
                out.append(self._state(path, obs, old, observed, rerun))
            if old != obs:
                prior[path] = old
                self._put(path, obs)
            seen = set()
            for akey, value in by_node.get(path, ()):
                seen.add(akey)
                if akey not in self.attrs or self.attrs[akey] != value:
                    out.append(self._attr(path, akey[1], akey[2], value, self.attrs.get(akey), observed))
                    self.attrs[akey] = value
            for akey in [k for k in known_by_node.get(path, ()) if k not in seen]:
                gone_value = False if akey[1] == "flag" else None  # a flag cleared, anything else deleted
                out.append(self._attr(path, akey[1], akey[2], gone_value, self.attrs.pop(akey), observed))
        if round_paths:  # families and suites that went round with their tasks (see _reruns)
            def before(path: str) -> NodeObs | None:
                return prior[path] if path in prior else self.nodes.get(path)
            for path in ancestors_round(round_paths, before, self.nodes, self.children):
                out.append(self._state(path, self.nodes[path], self.nodes[path], observed, True))
        if snap.full:
            gone = [p for p in self.nodes if p not in snap.nodes]
        else:
            gone = [p for p in self.nodes if any(p == g or p.startswith(g + "/") for g in snap.gone)]
        for path in gone:
            old = self._pop(path)
            out.append(StateChanged(source=self.source, backend="ecflow", key=path, observed=observed,
                                    state=State.UNKNOWN, previous=state_of(old.native), native_previous=old.native,
                                    try_no=old.try_no, detail=gone_reason))
        if gone:
            dead = set(gone)
            for akey in [k for k in self.attrs if k[0] in dead]:
                del self.attrs[akey]
        return out

    def _state(self, path: str, obs: NodeObs, old: NodeObs | None, observed: Observed, rerun: bool) -> StateChanged:
        """A node's transition; ``attrs`` carries the task's job run token (``run``) and the server's
        state change time (``since``), both seeded back from the journal, and ``rerun`` when it
        left its state and came back (:mod:`._reruns`)."""
        attrs: dict[str, Scalar] = {"run": obs.run} if obs.run else {}
        if obs.since:
            attrs["since"] = obs.since
        if rerun:
            attrs["rerun"] = True
        return StateChanged(source=self.source, backend="ecflow", key=path, observed=observed,
                            state=state_of(obs.native), native=obs.native,
                            previous=state_of(old.native) if old else None, native_previous=old.native if old else "",
                            try_no=obs.try_no, detail=obs.reason, attrs=attrs)

    def _attr(self, key: str, kind: str, name: str, value: Scalar, previous: Scalar,
              observed: Observed) -> AttributeChanged:
        return AttributeChanged(source=self.source, backend="ecflow", key=key, observed=observed, kind=kind,
                                name=name, value=value, previous=previous)


__all__ = ["SERVER_KEY", "NodeObs", "Snapshot", "Tree", "moved", "read_full", "read_paths", "server_pid", "state_of"]
