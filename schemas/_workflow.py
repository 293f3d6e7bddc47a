"""The flowbus description of a workflow: command-line jobs with dependencies.

One description is accepted by every backend that runs workflows (soma-workflow, ctrl_bps WMS
services, and QCG job sets): each adapter translates it into its own form (a soma ``Workflow``,
a ``GenericWorkflow``, QCG ``Jobs``). Plain data in, a validated frozen struct out; errors name
the job and what is wrong, so a bad description is rejected before anything is submitted.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ._errors import BackendRejected

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class JobSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One command-line job."""

    name: str
    #: the argv; the first element is the executable (no shell unless you write ``bash -c``)
    command: list[str]
    #: names of jobs that must succeed before this one starts
    after: list[str] = []
    #: extra environment variables
    env: dict[str, str] = {}
    #: working directory ("" = the backend's default)
    cwd: str = ""
    #: absolute paths of files the job reads. A backend that moves files (soma-workflow) copies
    #: each to where the job runs before it starts; a ``command`` argument equal to one of these
    #: paths stands for the file there. Elsewhere the paths are used as they are.
    inputs: list[str] = []
    #: absolute paths of files the job writes: copied back to these paths once the workflow is
    #: done (soma-workflow); a ``command`` argument equal to one stands for the file. At most one
    #: job writes a given path, and a job that reads it must come after that job.
    outputs: list[str] = []


class WorkflowSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named set of jobs forming a DAG."""

    name: str
    jobs: list[JobSpec]

    def job(self, name: str) -> JobSpec:
        for j in self.jobs:
            if j.name == name:
                return j
        raise KeyError(name)

    def order(self) -> list[JobSpec]:
        """Jobs in a dependency-respecting order (stable for independent jobs)."""
        done: set[str] = set()
        out: list[JobSpec] = []
        pending = list(self.jobs)
        while pending:
            ready = [j for j in pending if all(d in done for d in j.after)]
            if not ready:  # a cycle: the rest can never run (parse_workflow reports it)
                break
            for j in ready:
                done.add(j.name)
                out.append(j)
            pending = [j for j in pending if j.name not in done]
        return out


def parse_workflow(data: Any, where: str = "workflow") -> WorkflowSpec:
    """Validate a description (a mapping, JSON bytes/str, or a WorkflowSpec).

    Raises :class:`BackendRejected` naming ``where``, the job and the problem: unknown keys,
    wrong types, empty or duplicate names, an empty command, a dependency on an unknown job,
    a cycle."""
    if isinstance(data, WorkflowSpec):
        spec = data
    else:
        try:
            if isinstance(data, (bytes, str)):
                spec = msgspec.json.decode(data, type=WorkflowSpec)
            else:
                spec = msgspec.convert(data, WorkflowSpec)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise BackendRejected(f"{where}: invalid description: {exc}") from None
    if not _NAME.match(spec.name):
        raise BackendRejected(f"{where}: name {spec.name!r} must match {_NAME.pattern}")
    if not spec.jobs:
        raise BackendRejected(f"{where} {spec.name!r}: has no jobs")
    seen: set[str] = set()
    for i, job in enumerate(spec.jobs):
        at = f"{where} {spec.name!r}: jobs[{i}]"
        if not _NAME.match(job.name):
            raise BackendRejected(f"{at}: name {job.name!r} must match {_NAME.pattern}")
        if job.name in seen:
            raise BackendRejected(f"{at}: duplicate job name {job.name!r}")
        seen.add(job.name)
        if not job.command or not job.command[0]:
            raise BackendRejected(f"{at} ({job.name}): empty command")
    for i, job in enumerate(spec.jobs):
        for dep in job.after:
            if dep not in seen:
                raise BackendRejected(f"{where} {spec.name!r}: jobs[{i}] ({job.name}): depends on unknown job {dep!r}")
            if dep == job.name:
                raise BackendRejected(f"{where} {spec.name!r}: jobs[{i}] ({job.name}): depends on itself")
    if len(spec.order()) != len(spec.jobs):
        stuck = sorted(j.name for j in spec.jobs if j.name not in {o.name for o in spec.order()})
        raise BackendRejected(f"{where} {spec.name!r}: dependency cycle among {', '.join(stuck)}")
    _check_files(spec, where)
    return spec


def _check_files(spec: WorkflowSpec, where: str) -> None:
    """Input and output paths: absolute, once per job, one writer each, read after written."""
    writer: dict[str, str] = {}
    for i, job in enumerate(spec.jobs):
        at = f"{where} {spec.name!r}: jobs[{i}] ({job.name})"
        for kind, paths in (("inputs", job.inputs), ("outputs", job.outputs)):
            for path in paths:
                if not path.startswith("/") or "\0" in path:
                    raise BackendRejected(f"{at}: {kind} path {path!r} must be absolute")
            if len(set(paths)) != len(paths):
                raise BackendRejected(f"{at}: {kind} lists a path twice")
        both = sorted(set(job.inputs) & set(job.outputs))
        if both:
            raise BackendRejected(f"{at}: {both[0]!r} is both an input and an output")
        for path in job.outputs:
            if path in writer:
                raise BackendRejected(f"{at}: output {path!r} is also written by job {writer[path]!r}")
            writer[path] = job.name
    ancestors: dict[str, set[str]] = {}
    for job in spec.order():
        ancestors[job.name] = set(job.after).union(*(ancestors[d] for d in job.after))
    for i, job in enumerate(spec.jobs):
        for path in job.inputs:
            w = writer.get(path)
            if w is not None and w not in ancestors[job.name]:
                raise BackendRejected(f"{where} {spec.name!r}: jobs[{i}] ({job.name}): reads {path!r}, which job "
                                      f"{w!r} writes, but does not come after it (add it to 'after')")


__all__ = ["JobSpec", "WorkflowSpec", "parse_workflow"]
