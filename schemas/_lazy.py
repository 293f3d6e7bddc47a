"""Lazy re-exports for the package roots (PEP 562): a name is imported from its module on first
use, so ``import flowbus`` and the CLI's short commands load only what they touch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any], where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from ``package + where[name]``
    (a relative module name like ``"_codec"``, or an absolute one) and caches it in ``namespace``."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module __getattr__ of PEP 562
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = f"{package}.{module}" if module.startswith("_") else module
        value = getattr(importlib.import_module(target), name)
        namespace[name] = value
        return value

    return __getattr__
