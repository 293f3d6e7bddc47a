"""The ecFlow backend: a session watching one running ``ecflow_server`` (see :mod:`._session`),
its operations (:mod:`._ops`), the server tree and its diff (:mod:`._tree`), and the one place
ecFlow's errors become flowbus errors (:mod:`._errors`)."""

from ._session import EcflowSession

__all__ = ["EcflowSession"]
