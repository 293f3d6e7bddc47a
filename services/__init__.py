"""Backend adapters (plain Python, no Ray): one module per backend behind one interface."""

from ._base import BackendSession, Backoff, Emit, Releasable, dispatch, map_errors
from ._gs_callbacks import DifxCallbacks
from ._registry import session_for

__all__ = ["BackendSession", "Backoff", "DifxCallbacks", "Emit", "Releasable", "dispatch", "map_errors",
           "session_for"]
