"""``flowbus demo``: one cross-backend pipeline, end to end, on a private embedded stack
(:func:`run_demo`), and the loopback-only ``ecflow_server`` it runs (which the tests use too).

The names below are loaded from their modules on first use: ``flowbus demo`` imports Ray only
once it starts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowbus.schemas import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from ._run import run_demo
    from ._servers import HEAD_H, TAIL_H, LoopbackEcflowServer, ecflow_missing, free_port
    from ._stages import ECF_SCRIPTS

_WHERE = {
    "run_demo": "_run",
    "HEAD_H": "_servers", "TAIL_H": "_servers", "LoopbackEcflowServer": "_servers", "ecflow_missing": "_servers",
    "free_port": "_servers",
    "ECF_SCRIPTS": "_stages",
}


__getattr__ = _lazy_exports(__name__, globals(), _WHERE)

__all__ = ["ECF_SCRIPTS", "HEAD_H", "TAIL_H", "LoopbackEcflowServer", "ecflow_missing", "free_port", "run_demo"]
