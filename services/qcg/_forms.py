"""The two forms of a QCG job description ``submit`` takes (sans-I/O).

* the keyword form of ``Jobs.add``: ``{"name", "exec" | "script", "args", "numCores", "after", ...}``;
* QCG's own job JSON, as ``Jobs.add_std`` and the manager take it: ``{"name", "execution":
  {"exec" | "script", "args", ...}, "resources": {...}, "iteration": ..., "dependencies":
  {"after": [...]}}``.

A spec is kept (and saved, and resubmitted) in the form it was submitted in; only its
dependencies are read and rewritten here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from qcg.pilotjob.api.job import Jobs

#: top-level keys that only the keyword form has
_KEYWORD_ONLY = frozenset({"exec", "script", "args", "stdin", "stdout", "stderr", "wd", "modules", "venv",
                           "model", "model_opts", "numCores", "numNodes", "wt", "after"})


def is_std(spec: Mapping[str, Any]) -> bool:
    """QCG's own job JSON (it has ``execution``), not the keyword form."""
    return "execution" in spec


def problem(spec: Mapping[str, Any]) -> str:
    """Why ``spec`` is neither form ("" when it is one of them; QCG checks the rest)."""
    if not is_std(spec):
        return ""
    execution = spec["execution"]
    if not isinstance(execution, Mapping) or not ({"exec", "script"} & set(execution)):
        return "'execution' must be a dict with 'exec' or 'script'"
    mixed = sorted(_KEYWORD_ONLY & set(spec))
    if mixed:
        return f"QCG job JSON (with 'execution') cannot also have the keyword-form keys {mixed}"
    deps = spec.get("dependencies")
    if deps is not None and not (isinstance(deps, Mapping) and isinstance(deps.get("after", []), list)):
        return "'dependencies' must be a dict with 'after' a list of job names"
    return ""


def deps(spec: Mapping[str, Any]) -> list[str]:
    """The names in ``after`` (keyword form) or ``dependencies.after`` (QCG's JSON)."""
    raw = (spec.get("dependencies") or {}).get("after") if is_std(spec) else spec.get("after")
    if isinstance(raw, str):
        return [raw]
    return [d for d in raw if isinstance(d, str)] if isinstance(raw, list) else []


def dep_job(dep: str) -> str:
    """The job an ``after`` entry names: ``"a"``, ``"a:3"`` and ``"a:${it}"`` all name ``"a"``."""
    return dep.split(":", 1)[0]


def with_deps(spec: Mapping[str, Any], after: list[str]) -> dict[str, Any]:
    """A copy of ``spec`` depending on ``after`` only (no dependency at all when it is empty)."""
    out = copy.deepcopy(dict(spec))
    if is_std(out):
        dependencies = dict(out.get("dependencies") or {})
        if after:
            dependencies["after"] = after
        else:
            dependencies.pop("after", None)
        if dependencies:
            out["dependencies"] = dependencies
        else:
            out.pop("dependencies", None)
    elif after:
        out["after"] = after
    else:
        out.pop("after", None)
    return out


def add(batch: Jobs, spec: Mapping[str, Any]) -> None:
    """Add ``spec`` to ``batch`` in its own form (a copy: QCG edits what it is given)."""
    mine = copy.deepcopy(dict(spec))
    if is_std(mine):
        batch.add_std(mine)
    else:
        batch.add(**mine)


__all__ = ["add", "dep_job", "deps", "is_std", "problem", "with_deps"]
