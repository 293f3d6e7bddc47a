"""The DiFX guiServer backend: a session on one guiServer connection (:mod:`._session`), its
operations (:mod:`._ops`), guiServer traffic as typed events and the bookkeeping of jobs
(:mod:`._events`), the argument checks made before anything is sent (:mod:`._check`), and the
DiFX interface's callbacks on top of the bus (:mod:`._callbacks`, exported as
``flowbus.services.DifxCallbacks``).

The sans-I/O protocol core is :mod:`.protocol` (framing, the connection state machine, the
sub-stream decoders) with :mod:`.messages` (difxMessage documents): the one place the wire format is
written, shared with the emulator (:mod:`flowbus.services.guiserver_emulator`).
"""

from ._callbacks import DifxCallbacks
from ._session import GuiserverSession

__all__ = ["DifxCallbacks", "GuiserverSession"]
