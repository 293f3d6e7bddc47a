"""The demo's orchestration: ``[[rules]]`` that chain the stages across backends, and the
``[[policies]]`` entry that recovers the task that fails on purpose. The Orchestrator actor runs
them; the demo only kicks off the first stage and watches.

The same configuration as TOML (what ``flowbus up --config`` would take)::

    [[rules]]
    name = "suite-done-starts-ensemble"
    when = "ecflow/ops/state//demo/ingest state=complete"
    [[rules.then]]
    call = { session = "local", operation = "submit", args = [[{ name = "ensemble", exec = "/bin/echo", ... }]] }

    [[rules]]
    name = "ensemble-done-starts-workflows"
    when = "qcg/local/state/ensemble state=complete"
    [[rules.then]]
    call = { session = "soma", operation = "submit_workflow", args = [{ name = "demo-soma", jobs = [...] }] }
    [[rules.then]]
    call = { session = "wms", operation = "submit_workflow", args = [{ name = "demo-wms", jobs = [...] }] }

    [[rules]]
    name = "workflows-done-start-difx"
    when = { all = ["soma/soma/state/* native=workflow_done state=complete",
                    "wms/wms/state/*/demo-wms-*Z-[0-9] state=complete"] }
    [[rules.then]]
    call = { session = "difx", operation = "start_job", args = ["/data/demo/demo_1.input"] }

    [[policies]]
    name = "requeue-aborted-demo-tasks"
    match = "ecflow/ops/state//demo/*"
    on = ["aborted"]
    max-attempts = 2
    backoff = 0.2
"""

from __future__ import annotations

from typing import Any

from ._stages import DIFX_INPUT, ECF_FAILING, ECF_SUITE, QCG_JOB_SPEC, workflow_spec

#: workflow-level events only: soma's workflow natives are ``workflow_*`` (jobs say ``done``);
#: a WMS workflow is keyed by its submit path ``.../demo-wms-<UTC stamp>-<n>`` (jobs add ``/<job>``)
SOMA_DONE = "soma/soma/state/* native=workflow_done state=complete"
WMS_DONE = "wms/wms/state/*/demo-wms-*Z-[0-9] state=complete"


def _call(session: str, operation: str, *args: Any) -> dict[str, Any]:
    return {"call": {"session": session, "operation": operation, "args": list(args), "timeout": 120.0}}


def rules_and_policies(has_ecflow: bool, has_soma: bool,
                       has_wms: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Raw ``rules`` and ``policies`` tables (kebab-case keys, as in a TOML file)."""
    rules: list[dict[str, Any]] = []
    policies: list[dict[str, Any]] = []
    if has_ecflow:
        rules.append({"name": "suite-done-starts-ensemble", "when": f"ecflow/ops/state/{ECF_FAILING} state=complete",
                      "description": "the ecFlow suite's last task completed: run the QCG ensemble",
                      "then": [_call("local", "submit", [QCG_JOB_SPEC])]})
        policies.append({"name": "requeue-aborted-demo-tasks", "match": f"ecflow/ops/state//{ECF_SUITE}/*",
                         "on": ["aborted"], "max-attempts": 2, "backoff": 0.2})
    then = []
    if has_soma:
        then.append(_call("soma", "submit_workflow", workflow_spec("demo-soma")))
    if has_wms:
        then.append(_call("wms", "submit_workflow", workflow_spec("demo-wms")))
    after_qcg = "qcg/local/state/ensemble state=complete"
    if then:
        rules.append({"name": "ensemble-done-starts-workflows", "when": after_qcg,
                      "description": "every ensemble member succeeded: run the soma and WMS workflows",
                      "then": then})
    done = ([SOMA_DONE] if has_soma else []) + ([WMS_DONE] if has_wms else [])
    when: Any = {"all": done} if len(done) > 1 else done[0] if done else after_qcg
    rules.append({"name": "workflows-done-start-difx", "when": when,
                  "description": "both workflows completed: correlate on DiFX",
                  "then": [_call("difx", "start_job", DIFX_INPUT)]})
    return rules, policies
