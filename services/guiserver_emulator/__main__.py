"""``python -m flowbus.services.guiserver_emulator``: serve until interrupted."""

from ._server import main

raise SystemExit(main())
