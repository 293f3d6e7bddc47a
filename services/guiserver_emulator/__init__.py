"""A protocol-faithful DiFX guiServer on 127.0.0.1 that executes nothing: the guiServer
adapter's mock backend, a first-class peer of :mod:`flowbus.services.guiserver` (the way httpcore
ships its mock backend beside the real ones).

The server and its connections are in :mod:`._server`, the fake jobs, vex2difx runs and machines
definitions in :mod:`._jobs`. With the adapter it shares only the sans-I/O protocol core
(:mod:`flowbus.services.guiserver.protocol` for the framing, :mod:`flowbus.services.guiserver.messages`
for the difxMessage documents), so both speak the wire format from one place.

Run one by hand: ``flowbus emulate guiserver --port 50200 --sandbox DIR`` or
``python -m flowbus.services.guiserver_emulator --port 50200 --sandbox DIR``.
"""

from ._server import OUTCOMES, GuiserverEmulator, main

__all__ = ["OUTCOMES", "GuiserverEmulator", "main"]
