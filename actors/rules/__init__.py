"""The rules engine without Ray: conditions, actions, recovery policies, and the core that runs
them against the bus (``OrchestratorCore``). ``flowbus.rules`` runs it in your own process; the
Orchestrator actor (``flowbus.actors.Orchestrator``) runs it for the config file of ``flowbus up``.

Nothing here imports Ray (``tests/test_layout.py`` checks it).
"""

from ._conditions import AbsentNode, AllNode, AnyNode, CountNode, MatchNode, Node, SequenceNode, Trig
from ._core import (
    CHECKPOINT_FILE,
    ORCHESTRATOR_NAME,
    ORCHESTRATOR_SOURCE,
    Caller,
    OrchestratorCore,
    catalog_for,
    error_fields,
    merge_by_time,
)
from ._engine import (
    Action,
    CallSpec,
    Catalog,
    Engine,
    Firing,
    FiringCallback,
    PublishSpec,
    Rule,
    build_actions,
    build_node,
    check_match,
    compile_rule,
    compile_rules,
    dumps,
    loads,
    render,
    substitute,
)
from ._policies import (
    KILL_OPERATION,
    RETRY_OPERATION,
    Policy,
    Recovery,
    compile_policies,
    compile_policy,
    recovery_calls,
)

__all__ = [
    "CHECKPOINT_FILE",
    "KILL_OPERATION",
    "ORCHESTRATOR_NAME",
    "ORCHESTRATOR_SOURCE",
    "RETRY_OPERATION",
    "AbsentNode",
    "Action",
    "AllNode",
    "AnyNode",
    "CallSpec",
    "Caller",
    "Catalog",
    "CountNode",
    "Engine",
    "Firing",
    "FiringCallback",
    "MatchNode",
    "Node",
    "OrchestratorCore",
    "Policy",
    "PublishSpec",
    "Recovery",
    "Rule",
    "SequenceNode",
    "Trig",
    "build_actions",
    "build_node",
    "catalog_for",
    "check_match",
    "compile_policies",
    "compile_policy",
    "compile_rule",
    "compile_rules",
    "dumps",
    "error_fields",
    "loads",
    "merge_by_time",
    "recovery_calls",
    "render",
    "substitute",
]
