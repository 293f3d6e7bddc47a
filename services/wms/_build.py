"""From flowbus inputs to ctrl_bps objects (the WMS backend): the service class by path, the
BpsConfig of one workflow, and a ``GenericWorkflow`` built from a
:class:`~flowbus.schemas.WorkflowSpec`.

Everything here imports ``lsst.ctrl.bps`` lazily (about 2 s): the session module stays cheap.
"""

from __future__ import annotations

import getpass
import importlib
import os
import re
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowbus.schemas import BackendRejected, WmsSessionConfig, WorkflowSpec

#: files of a Parsl run that flowbus adds to its submit dir (cancel flag, job pids)
CANCEL_FLAG = "flowbus.cancel"
PID_DIR = "flowbus.pids"


def load_class(path: str, base_name: str = "BaseWmsService") -> type:
    """Import ``package.module.Class``; raise :class:`BackendRejected` naming the path and why."""
    from lsst.ctrl.bps import BaseWmsService

    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise BackendRejected(f"service class {path!r}: not a class path (package.module.Class)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's class path
        raise BackendRejected(f"service class {path!r}: cannot import {module_name!r}: "
                              f"{type(exc).__name__}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise BackendRejected(f"service class {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not isinstance(cls, type) or not issubclass(cls, BaseWmsService):
        raise BackendRejected(f"service class {path!r}: is not a subclass of lsst.ctrl.bps.{base_name}")
    return cls


def implements(cls: type | None, method: str) -> bool:
    """True when ``cls`` overrides ``BaseWmsService.<method>`` (the base only raises)."""
    from lsst.ctrl.bps import BaseWmsService

    return cls is not None and getattr(cls, method, None) is not getattr(BaseWmsService, method, None)


#: BpsConfig keys the session sets itself, with why a ``bps_config`` table may not change them
_SESSION_KEYS = {
    "wmsServiceClass": "the session's service is {cls} (set service-class)",
    "submitPath": "the session makes each workflow's submit path under submit-dir (set submit-dir)",
}


def check_session_keys(table: Mapping[str, Any], what: str, session: str, class_path: str) -> None:
    """Refuse (``BackendRejected``) a ``bps_config`` table that would change what the session
    observes through: another service class, or a submit path other than the one it made."""
    for key, why in _SESSION_KEYS.items():
        if key in table and not (key == "wmsServiceClass" and table[key] == class_path):
            raise BackendRejected(f"{what}: bps_config key {key!r} is refused on session {session!r}: "
                                  + why.format(cls=class_path))


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def base_config(cfg: WmsSessionConfig, submit_path: str | None = None, extra: Mapping[str, Any] | None = None,
                guard: str = "") -> Any:
    """The BpsConfig: flowbus defaults, then ``cfg.bps_config``, then ``extra`` (per workflow);
    ``guard`` goes before the site's ``commandPrefix`` (Parsl only)."""
    from lsst.ctrl.bps import BpsConfig

    site: dict[str, Any] = {"class": cfg.site_class, "cores": cfg.cores, "retries": cfg.retries}
    data: dict[str, Any] = {
        "wmsServiceClass": cfg.service_class,
        "computeSite": cfg.compute_site,
        "operator": cfg.operator or _login(),
        "site": {cfg.compute_site: site},
    }
    if submit_path is not None:
        site["run_dir"] = os.path.join(submit_path, "runinfo")
        data["submitPath"] = submit_path
    data = _merge(_merge(data, cfg.bps_config), extra or {})
    if guard:
        site_name = str(data.get("computeSite", cfg.compute_site))
        sites = dict(data.get("site") or {})
        data["site"] = sites
        one = dict(sites.get(site_name) or {})
        one["commandPrefix"] = "\n".join(p for p in (guard, str(one.get("commandPrefix", ""))) if p)
        sites[site_name] = one
    return BpsConfig(data)


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "flowbus"


def new_submit_path(root: str, name: str) -> str:
    """A fresh directory ``<root>/<name>-<UTC time>-<n>`` (created)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1, 10_000):
        path = os.path.join(root, f"{name}-{stamp}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise BackendRejected(f"submit dir {root!r}: no free name for {name!r}")


def _escape(text: str) -> str:
    # ParslJob runs ``str.format(**cmdvals)`` over the command line: braces must be doubled
    return text.replace("{", "{{").replace("}", "}}")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def generic_workflow(spec: WorkflowSpec) -> Any:
    """A ``GenericWorkflow`` of ``spec`` (label = job name). ``env`` and ``cwd`` go through
    ``/usr/bin/env [-C cwd] K=V ... argv`` so every WMS honours them; they are also set on the
    job (``environment``) for services that read it."""
    from lsst.ctrl.bps import GenericWorkflow, GenericWorkflowExec, GenericWorkflowJob

    gw = GenericWorkflow(spec.name)
    for job in spec.order():
        for k in job.env:
            if not _ENV_NAME.match(k):
                raise BackendRejected(f"workflow {spec.name!r}: job {job.name!r}: "
                                      f"env name {k!r} is not a variable name")
        argv = list(job.command)
        if job.env or job.cwd:
            prefix = ["/usr/bin/env"] + (["-C", job.cwd] if job.cwd else []) + [f"{k}={v}" for k, v in job.env.items()]
            argv = prefix + argv
        exe = GenericWorkflowExec(name=os.path.basename(argv[0]) or argv[0], src_uri=shlex.quote(argv[0]),
                                  transfer_executable=False)
        gjob = GenericWorkflowJob(name=job.name, label=job.name, executable=exe,
                                  arguments=_escape(shlex.join(argv[1:])), environment=dict(job.env))
        gw.add_job(gjob, parent_names=list(job.after) or None)
    return gw


def parsl_guard(submit_path: str) -> str:
    """The bash lines run before each Parsl job: a cancelled workflow's jobs exit 130 at once,
    and each job records its shell's pid so :meth:`cancel` can end it."""
    flag = shlex.quote(os.path.join(submit_path, CANCEL_FLAG))
    pids = shlex.quote(os.path.join(submit_path, PID_DIR))
    return f"if [ -e {flag} ]; then exit 130; fi; mkdir -p {pids} && echo $$ > {pids}/$$"


__all__ = ["CANCEL_FLAG", "PID_DIR", "base_config", "check_session_keys", "generic_workflow", "implements",
           "load_class", "new_submit_path", "parsl_guard"]
