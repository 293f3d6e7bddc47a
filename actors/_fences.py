"""The Ray fences (their reasons: :mod:`._ray`): environment variables Ray reads when it is
*imported*, so they must be set before ``import ray`` anywhere in the process.

``flowbus.actors`` imports this module first and nothing else eagerly: importing the package, or
``flowbus.actors.rules`` (no Ray), sets the fences, and every module here that imports Ray does so
after them (``_ray`` imports this module again, first, for readers of that file alone).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_AUTH_MODE"] = "token"  # forced, not a default: see the docstring of ._ray
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
