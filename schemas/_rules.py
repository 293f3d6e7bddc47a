"""Orchestration config: rules ("when <condition> then <actions>") and recovery policies.

TOML (see README, *Orchestration*)::

    [[rules]]
    name = "ingest-done"
    when = "ecflow/ops/state//prod/ingest state=complete"     # a match expression, or a table:
    # when = { all = [...] } | { any = [...] } | { sequence = [...] }
    #      | { count = "<match>", n = 3, within = 60 }
    #      | { absent = "<match>", after = "<match or table>", within = 600 }
    [[rules.then]]
    call = { session = "local", operation = "submit", args = [[{ name = "ens", exec = "/bin/true" }]] }
    [[rules.then]]
    publish = { type = "log", key = "{key}", message = "ingest done", level = "info" }

    [[policies]]
    name = "retry-qcg"
    match = "qcg/*/state/*"
    on = ["aborted"]
    max-attempts = 3
    backoff = 1.0
    stalled-after = 600
    on-stalled = "alert"
    give-up-after = 60

Only the shape is checked here (unknown keys are errors); what the rules refer to (backends,
sessions, operations, match syntax) is checked per rule when the orchestrator loads them, so one
bad rule is rejected by name and the others keep running.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class _RConf(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    pass


class WhenTable(_RConf, frozen=True):
    """A composite condition; exactly one of ``all``, ``any``, ``sequence``, ``count``, ``absent``.

    - ``all``: every child condition was satisfied (in any order) since the rule last fired;
    - ``any``: one child condition is satisfied;
    - ``sequence``: the children are satisfied one after the other, in order;
    - ``count`` + ``n`` (+ ``within`` seconds): ``n`` satisfactions within a sliding window
      (``within = 0``: no window);
    - ``absent`` + ``after`` + ``within``: after ``after`` is satisfied, no event matching
      ``absent`` arrived within ``within`` seconds. With ``per-key`` (the default) the timer
      belongs to the (source, key) of the event that satisfied ``after``, and only an ``absent``
      event of that same source and key cancels it. An event that matches both cancels and
      starts again ("no progress for T" restarts at every progress event).
    """

    all: list[When] | None = None
    any: list[When] | None = None
    sequence: list[When] | None = None
    count: When | None = None
    n: int = 1
    within: float = 0.0
    absent: str | None = None
    after: When | None = None
    per_key: bool = True


#: a match expression (``<topic-glob> field=value|value field!=value``) or a composite table
When = str | WhenTable


class CallAction(_RConf, frozen=True):
    """Run ``operation`` of session ``session`` (any backend operation, through the Supervisor).

    Strings in ``args``/``kwargs`` may name fields of the triggering event: ``"{key}"``,
    ``"{source}"``, ``"{state}"``, ``"{attrs.input}"``, ``"{rule}"``; a string that is exactly
    ``"{field}"`` takes the field's value with its type. Unknown names are left as they are.
    """

    session: str
    operation: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    timeout: float = 120.0


class ThenAction(_RConf, frozen=True):
    """One action; exactly one of ``call`` and ``publish``.

    ``publish`` is an event to publish under the orchestrator's source: ``type`` is an event
    tag (``log``, ``state``, ``attr``, ...; default ``log``), the other keys are its fields
    (``key``, ``message``, ``level``, ``state``, ...), with the same ``{field}`` substitution.
    """

    call: CallAction | None = None
    publish: dict[str, Any] | None = None


class RuleConfig(_RConf, frozen=True):
    """``when`` the condition is satisfied, run ``then`` in order (a RuleFired event first)."""

    name: str
    when: When
    then: list[ThenAction] = []
    enabled: bool = True
    description: str = ""


def _aborted() -> list[str]:
    return ["aborted"]


class PolicyConfig(_RConf, frozen=True):
    """Automatic recovery for resources whose topic matches ``match`` (``<backend>/<session>/state/<key>``).

    - a ``StateChanged`` to one of ``on`` retries with the backend's own operation (ecflow
      requeue, qcg remove+submit, soma restart_workflow, wms restart, guiserver stop+start with
      force), after ``backoff`` seconds doubling per attempt (capped at ``backoff-max``), up to
      ``max-attempts``; then ``RecoveryGaveUp``. A ``complete`` state resets the count.
    - ``stalled-after`` > 0: a resource that became ``active`` and has no event for that many
      seconds is stalled: ``alert`` (a ``LogLine`` level ``alert``) or ``kill-retry``.
    - ``give-up-after`` > 0: a session ``Disconnected`` without ``Connected`` for that many
      seconds gives ``RecoveryGaveUp`` (key = the session).
    - ``operation``: another operation than the backend's default retry, called with the key.
    """

    name: str
    match: str
    on: list[str] = msgspec.field(default_factory=_aborted)
    max_attempts: int = 3
    backoff: float = 1.0
    backoff_max: float = 300.0
    stalled_after: float = 0.0
    on_stalled: Literal["alert", "kill-retry"] = "alert"
    give_up_after: float = 0.0
    operation: str = ""
    enabled: bool = True


def raw_rule_problem(data: Any) -> str | None:
    """The first shape error of a ``rules``/``policies`` entry, naming its index and name (the
    whole file is refused, as for any unknown key); None if every entry has a valid shape."""
    if not isinstance(data, dict):
        return None
    for kind, cls in (("rules", RuleConfig), ("policies", PolicyConfig)):
        items = data.get(kind)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            try:
                msgspec.convert(item, cls)
            except msgspec.ValidationError as exc:
                text = str(exc)
                where = ""
                if " - at `" in text:
                    text, _, path = text.partition(" - at `")
                    where = path.rstrip("`").removeprefix("$").removeprefix(".")
                label = f"{kind}[{i}]" + (f" ({name!r})" if isinstance(name, str) else "")
                field = text.removeprefix("Object contains unknown field ")
                if field != text:
                    key = field.strip("`")
                    return f"{label}: unknown key {(where + '.' if where else '') + key!r}"
                return f"{label}{('.' + where) if where else ''}: {text}"
    return None


def check_rules(rules: list[RuleConfig], policies: list[PolicyConfig]) -> str | None:
    """Structural problems that make the whole file unusable (duplicate names); None if fine."""
    for kind, names in (("rules", [r.name for r in rules]), ("policies", [p.name for p in policies])):
        seen: set[str] = set()
        for i, n in enumerate(names):
            if not n:
                return f"{kind}[{i}].name: must be non-empty"
            if n in seen:
                return f"{kind}: duplicate name {n!r}"
            seen.add(n)
    return None


__all__ = ["CallAction", "PolicyConfig", "RuleConfig", "ThenAction", "When", "WhenTable", "check_rules",
           "raw_rule_problem"]
