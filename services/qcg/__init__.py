"""The QCG-PilotJob backend: a session with one manager it starts or connects to (see
:mod:`._session`), its operations (:mod:`._ops`), the session's view of the jobs (:mod:`._jobs`)
and what the manager says about them (:mod:`._observe`), one connection to a manager
(:mod:`._link`) over QCG's client with bounded requests (:mod:`._client`), the manager as a
process of its own (:mod:`._service`), and the working directory with the submitted specs kept
there (:mod:`._specs`)."""

from ._session import QcgSession

__all__ = ["QcgSession"]
