"""Backend adapters (plain Python, no Ray): one package per backend on one SessionBase."""

from ._base import BackendSession, Backoff, Emit, Releasable, dispatch, map_errors
from ._ops import Operations
from ._registry import session_for
from ._session import Opened, Phase, SessionBase
from .guiserver import DifxCallbacks

__all__ = [
           "BackendSession",
           "Backoff",
           "DifxCallbacks",
           "Emit",
           "Opened",
           "Operations",
           "Phase",
           "Releasable",
           "SessionBase",
           "dispatch",
           "map_errors",
           "session_for",
]
