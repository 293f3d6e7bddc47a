"""Backend adapters (plain Python, no Ray): one module per backend behind one interface."""

from ._base import BackendSession, Backoff, Emit, Releasable, dispatch, map_errors
from ._registry import session_for
from .guiserver import DifxCallbacks

__all__ = ["BackendSession", "Backoff", "DifxCallbacks", "Emit", "Releasable", "dispatch", "map_errors",
           "session_for"]
