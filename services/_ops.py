"""One way to declare a backend's operations: an :class:`Operations` table filled by decorating
plain functions, each named as the operation it is and taking the session first::

    OPS: Operations[EcflowSession] = Operations("ecflow")

    @OPS.op
    def suspend(session: EcflowSession, path: str) -> None:
        ...

    @OPS.named("print")  # only where the operation's name is not a usable Python name
    def print_(session: EcflowSession) -> str:
        ...

``session.call("suspend", "/s")`` looks the name up, checks the arguments against the
function's signature (``BackendRejected`` naming the operation when they do not fit) and runs
it. An unknown name raises ``UnknownOperation`` listing the known ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from flowbus.schemas import BackendError, BackendRejected, UnknownOperation

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Any])


class Operations(Generic[S]):
    """The operations of one backend: name -> function(session, *args, **kwargs)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._table: dict[str, Callable[..., Any]] = {}
        self._signatures: dict[str, inspect.Signature] = {}

    def op(self, func: F) -> F:
        """Register ``func`` under its own name."""
        return self.named(func.__name__)(func)

    def named(self, name: str) -> Callable[[F], F]:
        """Register the decorated function under ``name`` (for names Python cannot spell)."""

        def register(f: F) -> F:
            if name in self._table:
                raise ValueError(f"{self.backend}: operation {name!r} declared twice")
            sig = inspect.signature(f)
            self._table[name] = f
            self._signatures[name] = sig.replace(parameters=list(sig.parameters.values())[1:])
            return f

        return register

    def names(self) -> list[str]:
        return sorted(self._table)

    def table(self) -> Mapping[str, Callable[..., Any]]:
        return dict(self._table)

    def bound(self, operation: str, args: tuple[Any, ...] | list[Any], kwargs: Mapping[str, Any]) -> float | None:
        """How long ``operation`` with these arguments may take by its own ``timeout`` argument
        (given, or its default), or None when it has none (or the arguments do not fit)."""
        sig = self._signatures.get(operation)
        if sig is None or "timeout" not in sig.parameters:
            return None
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        value = bound.arguments.get("timeout")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            return None
        return float(value)

    def run(self, session: S, operation: str, args: tuple[Any, ...] | list[Any],
            kwargs: Mapping[str, Any]) -> Any:
        func = self._table.get(operation)
        if func is None:
            known = ", ".join(self.names())
            raise UnknownOperation(f"unknown operation {operation!r}; known: {known}")
        try:
            self._signatures[operation].bind(*args, **kwargs)
        except TypeError as exc:
            raise BackendRejected(f"{operation}: {exc}") from None
        try:
            return func(session, *args, **kwargs)
        except BackendError as exc:
            if operation not in str(exc):  # every error says which operation it came from
                exc.args = (f"{operation}: {exc}", *exc.args[1:])
            raise


__all__ = ["Operations"]
