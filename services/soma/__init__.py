"""The soma-workflow backend: a session with one ``WorkflowController`` (see :mod:`._session`),
its operations (:mod:`._ops`), building and ending the controller and its job processes
(:mod:`._engine`), and workflows in, states out (:mod:`._wf`)."""

from flowbus.schemas import SomaSessionConfig

from ._session import SomaSession

__all__ = ["SomaSession", "SomaSessionConfig"]
