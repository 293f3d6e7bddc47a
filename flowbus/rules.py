"""Rules, recovery policies and composite waits in your own process (Python callables as actions).

The same engine as the Orchestrator actor that ``flowbus up`` runs for the config file's
``[[rules]]``/``[[policies]]``::

    import flowbus
    from flowbus.rules import Call, Publish, Rules

    client = flowbus.connect()
    with Rules(client) as rules:
        rules.add("ingest-done", when="ecflow/ops/state//prod/ingest state=complete",
                  then=[Call("local", "submit", [[{"name": "ens", "exec": "/bin/true", "iteration": 4}]]),
                        lambda firing: print("fired by", firing.event["key"])])
        firing = rules.wait({"all": ["qcg/local/state/a final=true", "qcg/local/state/b final=true"]}, timeout=60)

``Call`` actions (and :meth:`Rules.call`) go through ``client``'s command path to the
``flowbus up`` serving its bus (:func:`client_caller`, the default: no Ray needed), or pass
``caller=supervisor_caller()`` from a process that joined its Ray, or any
``caller(CallSpec) -> result``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from flowbus.actors.rules import (
    ORCHESTRATOR_NAME,
    CallSpec,
    Catalog,
    Engine,
    Firing,
    FiringCallback,
    OrchestratorCore,
    PublishSpec,
    Rule,
    build_actions,
    build_node,
    compile_policy,
    merge_by_time,
)
from flowbus.bus import Client
from flowbus.schemas import ConfigError, PolicyConfig, ThenAction, WaitSatisfied, WaitTimeout, When, WhenTable

#: a backend call action: ``Call(session, operation, args, kwargs, timeout)``
Call = CallSpec

ActionLike = ThenAction | CallSpec | PublishSpec | FiringCallback | Mapping[str, Any]
WhenLike = When | Mapping[str, Any]


def Publish(type: str = "log", **fields: Any) -> PublishSpec:  # noqa: N802 - reads as an action constructor
    """An event to publish when the rule fires: ``Publish("log", key="{key}", message="...")``."""
    return PublishSpec(type=type, fields=fields)


def client_caller(client: Client) -> Callable[[CallSpec], Any]:
    """Run calls as ``flowbus call`` does: through ``client``'s broker to the ``flowbus up`` serving it
    (its Supervisor finds the session wherever it runs; the wait follows the operation's own bound)."""

    def call(spec: CallSpec) -> Any:
        return client.call(spec.session, spec.operation, spec.args, spec.kwargs, timeout=spec.timeout)

    return call


def supervisor_caller(name: str = "flowbus-supervisor") -> Callable[[CallSpec], Any]:
    """Run calls through the Supervisor actor ``name`` (Ray must be joined: ``flowbus.actors.join_ray``)."""
    import ray

    from flowbus.actors import call_through

    handle: list[Any] = []

    def call(spec: CallSpec) -> Any:
        if not handle:
            handle.append(ray.get_actor(name))
        return call_through(handle[0], spec.session, spec.operation, spec.args, spec.kwargs, spec.timeout)

    return call


def _when_text(when: WhenLike) -> str:
    if isinstance(when, str):
        return when
    raw = msgspec.to_builtins(when) if isinstance(when, WhenTable) else dict(when)
    return msgspec.json.encode(raw).decode()


class Rules:
    """Rules and policies following ``client``'s broker in a background thread.

    ``source`` names the events it publishes (RuleFired, RecoveryAttempted, ErrorEvent, ...).
    With ``checkpoint`` (a file path) progress survives a restart of your process, as the
    Orchestrator's does; ``sessions`` (name -> backend) lets rules be checked against them.
    ``caller`` runs ``Call`` actions; by default :func:`client_caller` (``client``'s ``flowbus up``)."""

    def __init__(self, client: Client, *, caller: Callable[[CallSpec], Any] | None = None, source: str = "rules",
                 checkpoint: str | Path | None = None, sessions: Mapping[str, str] | None = None) -> None:
        self.client = client
        self.catalog = Catalog(sessions)
        self._core = OrchestratorCore(client.address, caller=caller or client_caller(client), checkpoint=checkpoint,
                                      source=source, curve=client.curve, sessions=dict(sessions or {}))
        self._started = False

    def add(self, name: str, when: WhenLike, then: Sequence[ActionLike] | ActionLike = ()) -> None:
        """Add a rule; a bad one raises ConfigError naming it (nothing is added)."""
        actions = [then] if callable(then) or isinstance(then, (CallSpec, PublishSpec, ThenAction, Mapping)) else then
        try:
            rule = Rule(name, build_node(when, self.catalog), build_actions(list(actions), self.catalog),
                        fingerprint=f"api:{name}:{_when_text(when)}")
        except ConfigError as exc:
            raise ConfigError(f"rule {name!r}: {exc}") from None
        with self._core.lock:
            self._core.engine.add(rule)

    def remove(self, name: str) -> None:
        with self._core.lock:
            self._core.engine.remove(name)

    def policy(self, name: str, match: str, **options: Any) -> None:
        """Add a recovery policy (options as in ``[[policies]]``, with underscores: ``max_attempts=3``)."""
        try:
            cfg = msgspec.convert({"name": name, "match": match,
                                   **{k.replace("_", "-"): v for k, v in options.items()}}, PolicyConfig)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"policy {name!r}: {exc}") from None
        pol = compile_policy(cfg, self.catalog)
        with self._core.lock:
            self._core.policies[name] = pol

    def start(self) -> Rules:
        """Follow the bus (from the checkpoint when there is one, else live events)."""
        if not self._started:
            self._core.start()
            self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._core.stop()
            self._started = False

    def status(self) -> dict[str, Any]:
        return self._core.status()

    def call(self, session: str, operation: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        """Run a backend call through this runner's caller (QCG submissions become retryable)."""
        return self._core.call(CallSpec(session=session, operation=operation, args=list(args), kwargs=kwargs,
                                        timeout=timeout))

    def wait(self, when: WhenLike, timeout: float = 30.0) -> Firing:
        """Block until the condition is satisfied; the current state counts (like ``Client.wait``).

        Arm-then-act: the subscription is live before the snapshot is read, so nothing that
        happens meanwhile is missed. Raises WaitTimeout naming the condition; publishes
        ``WaitSatisfied`` when the runner is started."""
        engine = Engine([Rule("wait", build_node(when, self.catalog), [])])
        deadline = time.monotonic() + timeout
        with self.client.subscribe("", start="snapshot") as sub:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(_when_text(when), timeout)
                for ev in merge_by_time(sub.recv_many(min(left, 0.2))):
                    got = engine.feed(ev)
                    if got:
                        return self._satisfied(when, got[0])
                got = engine.tick(time.time())
                if got:
                    return self._satisfied(when, got[0])

    def _satisfied(self, when: WhenLike, firing: Firing) -> Firing:
        if self._started:
            self._core._publish(WaitSatisfied(source=self._core.source, backend="flowbus",
                                              key=str(firing.event.get("key", "")), match=_when_text(when)[:1000],
                                              detail=firing.idempotency_key[:1000]))
        return firing

    def __enter__(self) -> Rules:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def rule(client: Client, name: str, when: WhenLike, then: Sequence[ActionLike] | ActionLike = (),
         **kwargs: Any) -> Rules:
    """One rule, started: ``r = flowbus.rules.rule(client, "x", when=..., then=print)``; ``r.stop()``."""
    rules = Rules(client, **kwargs)
    rules.add(name, when, then)
    return rules.start()


__all__ = ["ORCHESTRATOR_NAME", "Call", "CallSpec", "Firing", "Publish", "PublishSpec", "Rules", "client_caller",
           "rule", "supervisor_caller"]
